//! Policy expressions: compiled once, evaluated against a request; unsupported constructs refused
//! with line and column; secrets out of reach.

use std::collections::HashMap;
use std::sync::Arc;

use apim_policy::{
    CompileError, EvalError, JsonToken, Position, Program, RequestSnapshot, Value, compile, compile_value,
};

fn at(line: u32, column: u32) -> Position {
    Position { line, column }
}

/// A request with a subscription, headers, query, variables, a JSON body and a 429 response.
fn request() -> RequestSnapshot {
    RequestSnapshot {
        subscription: Some(("sub-1".into(), "Team A".into())),
        api: ("openai".into(), "Azure OpenAI".into()),
        operation: ("chat-completions".into(), "Creates a completion".into()),
        client_ip: "10.1.2.3".into(),
        headers: vec![
            ("X-User".into(), "Ada".into()),
            ("x-list".into(), "a".into()),
            ("x-list".into(), "b".into()),
            ("Ocp-Apim-Subscription-Key".into(), "SUBSCRIPTION-KEY".into()),
            ("api-key".into(), "BACKEND-KEY".into()),
            ("Authorization".into(), "Bearer TOKEN".into()),
        ],
        query: vec![("api-version".into(), "2024-10-21".into()), ("subscription-key".into(), "QUERY-KEY".into())],
        variables: HashMap::from([
            ("aoai-token".to_string(), Value::Str("tok".into())),
            ("count".to_string(), Value::Int(7)),
            ("csv".to_string(), Value::Str("a,b;c".into())),
        ]),
        response_status: Some(429),
        region: "West Europe".into(),
        body: Some(Arc::new(serde_json::json!({
            "model": "gpt-4o",
            "max_tokens": 100,
            "stream": true,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        }))),
    }
}

fn program(src: &str) -> Program {
    compile(src, Position::START).unwrap_or_else(|e| panic!("{src}: {e}"))
}

fn eval_in(src: &str, request: &RequestSnapshot) -> Result<Value, EvalError> {
    program(src).evaluate(request)
}

fn eval(src: &str) -> Value {
    eval_in(src, &request()).unwrap_or_else(|e| panic!("{src}: {e}"))
}

fn s(text: &str) -> Value {
    Value::Str(text.into())
}

fn refused(src: &str) -> CompileError {
    compile(src, Position::START).expect_err(src)
}

#[test]
fn the_reference_policy_expressions() {
    assert_eq!(eval(r#"@("Bearer " + (string)context.Variables["aoai-token"])"#), s("Bearer tok"));
    assert_eq!(eval(r#"@(context.Subscription?.Id ?? "anonymous")"#), s("sub-1"));
    let anonymous = RequestSnapshot { subscription: None, ..request() };
    assert_eq!(eval_in(r#"@(context.Subscription?.Id ?? "anonymous")"#, &anonymous), Ok(s("anonymous")));
    assert_eq!(eval("@(context.Api.Id)"), s("openai"));
    assert_eq!(eval("@(context.Operation.Id)"), s("chat-completions"));
    assert_eq!(eval("@(context.Request.IpAddress)"), s("10.1.2.3"));
}

#[test]
fn context_members() {
    assert_eq!(
        eval("@(context.Subscription.Name + context.Api.Name + context.Operation.Name)"),
        s("Team AAzure OpenAICreates a completion")
    );
    assert_eq!(eval("@(context.Deployment.Region)"), s("West Europe"));
    assert_eq!(eval("@(context.Response.StatusCode == 429 || context.Response.StatusCode >= 500)"), Value::Bool(true));
    assert_eq!(eval(r#"@(context.Request.Headers.GetValueOrDefault("x-user", "anonymous"))"#), s("Ada"));
    assert_eq!(eval(r#"@(context.Request.Headers.GetValueOrDefault("x-list"))"#), s("a,b"));
    assert_eq!(eval(r#"@(context.Request.Headers.GetValueOrDefault("x-none", "N/A"))"#), s("N/A"));
    assert_eq!(eval(r#"@(context.Request.Headers.GetValueOrDefault("x-none"))"#), Value::Null);
    assert_eq!(eval(r#"@(context.Request.Url.Query.GetValueOrDefault("api-version", ""))"#), s("2024-10-21"));
    assert_eq!(eval(r#"@(context.Variables.GetValueOrDefault<int>("count") + 1)"#), Value::Int(8));
    assert_eq!(eval(r#"@(context.Variables.GetValueOrDefault<int>("missing"))"#), Value::Int(0));
    assert_eq!(eval(r#"@(context.Variables.GetValueOrDefault<string>("missing", "d"))"#), s("d"));
    assert_eq!(eval(r#"@(context.Variables.GetValueOrDefault("missing") == null)"#), Value::Bool(true));
    assert_eq!(
        eval(r#"@(context.Variables.ContainsKey("count") && !context.Variables.ContainsKey("x"))"#),
        Value::Bool(true)
    );
}

#[test]
fn the_request_body_as_json() {
    let body = r#"context.Request.Body.As<JObject>(preserveContent: true)"#;
    assert_eq!(eval(&format!(r#"@((string){body}["model"])"#)), s("gpt-4o"));
    assert_eq!(eval(&format!(r#"@({body}["messages"][1]["content"].ToString())"#)), s("hello"));
    assert_eq!(eval(&format!(r#"@({body}["messages"].Length)"#)), Value::Int(2));
    assert_eq!(eval(&format!(r#"@({body}.Value<string>("model"))"#)), s("gpt-4o"));
    assert_eq!(eval(&format!(r#"@({body}.Value<int>("max_tokens") * 2)"#)), Value::Int(200));
    assert_eq!(eval(&format!(r#"@((bool){body}["stream"])"#)), Value::Bool(true));
    assert_eq!(eval(&format!(r#"@({body}["missing"] == null)"#)), Value::Bool(true));
    assert_eq!(eval(&format!(r#"@({body}["stream"].ToString())"#)), s("True"));
    assert_eq!(
        eval(r#"@(context.Request.Body.As<JObject>(true)["model"].ToString().StartsWith("gpt-4"))"#),
        Value::Bool(true)
    );
    // A JSON token kept in a variable (as set-variable stores `Body.As<JObject>()`) indexes the same way.
    let mut with_json = request();
    let body = with_json.body.clone().map(JsonToken::new).map(Value::Json).expect("a body");
    with_json.variables.insert("body".into(), body);
    assert_eq!(
        eval_in(
            r#"@(context.Variables["body"]["messages"][0].Value<string>("role") + context.Variables["body"]["max_tokens"])"#,
            &with_json
        ),
        Ok(s("system100"))
    );
    let e = eval_in(r#"@(context.Variables["body"]["messages"][2])"#, &with_json).expect_err("out of range");
    assert!(e.message.contains("outside the 2 items"), "{e}");
    let no_body = RequestSnapshot { body: None, ..request() };
    assert_eq!(
        eval_in(r#"@(context.Request.Body?.As<JObject>()?["model"]?.ToString() ?? "none")"#, &no_body),
        Ok(s("none"))
    );
}

#[test]
fn operators() {
    assert_eq!(eval(r#"@(1 + 2 * 3 - 4 / 2 % 3)"#), Value::Int(5));
    assert_eq!(eval(r#"@("n=" + 1 + 2)"#), s("n=12"));
    assert_eq!(eval(r#"@(1 + 2 + "=n")"#), s("3=n"));
    assert_eq!(eval(r#"@(0.5 + 1)"#), Value::Double(1.5));
    assert_eq!(eval(r#"@(-context.Variables.GetValueOrDefault<int>("count"))"#), Value::Int(-7));
    assert_eq!(eval(r#"@(1 < 2 && 2 <= 2 && 3 > 2 && 3 >= 4 == false)"#), Value::Bool(true));
    assert_eq!(eval(r#"@(!(1 == 1) || "a" != "b")"#), Value::Bool(true));
    assert_eq!(eval(r#"@(context.Response.StatusCode == 429 ? "throttled" : "ok")"#), s("throttled"));
    assert_eq!(eval(r#"@(null ?? null ?? "third")"#), s("third"));
    assert_eq!(eval(r#"@((string)null + "x")"#), s("x"));
    assert_eq!(eval(r#"@((int)(7.9) + (int)context.Variables["count"])"#), Value::Int(14));
    // `&&` does not evaluate its right side when the left is false: no missing-variable error.
    assert_eq!(eval(r#"@(false && (string)context.Variables["missing"] == "x")"#), Value::Bool(false));
}

#[test]
fn string_methods_and_statics() {
    assert_eq!(eval(r#"@("MiXed".ToLower() + "MiXed".ToUpper())"#), s("mixedMIXED"));
    assert_eq!(
        eval(r#"@("gpt-4o-mini".Contains("4o") && "gpt".StartsWith("g") && "gpt".EndsWith("pt"))"#),
        Value::Bool(true)
    );
    assert_eq!(eval(r#"@(((string)context.Variables["csv"]).Split(',', ';')[2])"#), s("c"));
    assert_eq!(eval(r#"@(((string)context.Variables["csv"]).Split(',').Length)"#), Value::Int(2));
    assert_eq!(eval(r#"@("héllo".Length)"#), Value::Int(5));
    assert_eq!(eval(r#"@(int.Parse(" 42 ") + 1)"#), Value::Int(43));
    assert_eq!(eval(r#"@(string.Format("{0}-{1}-{0} {{x}}", "a", 2))"#), s("a-2-a {x}"));
    assert_eq!(
        eval(r#"@(string.IsNullOrEmpty("") && string.IsNullOrEmpty(null) && !string.IsNullOrEmpty("a"))"#),
        Value::Bool(true)
    );
    assert_eq!(eval(r#"@(string.IsNullOrWhiteSpace("  ") && string.Empty == "")"#), Value::Bool(true));
    assert_eq!(eval(r#"@("a".Equals("a") && " t ".Trim() == "t")"#), Value::Bool(true));
    assert_eq!(
        eval(r#"@("West US".Equals(context.Deployment.Region, StringComparison.OrdinalIgnoreCase))"#),
        Value::Bool(false)
    );
    assert_eq!(
        eval(r#"@("WEST europe".Equals(context.Deployment.Region, StringComparison.OrdinalIgnoreCase))"#),
        Value::Bool(true)
    );
    assert_eq!(
        eval(r#"@("WEST europe".Equals(context.Deployment.Region, StringComparison.Ordinal))"#),
        Value::Bool(false)
    );
    assert_eq!(
        eval(
            r#"@("GPT-4o".StartsWith("gpt", StringComparison.OrdinalIgnoreCase) && !"GPT".Contains("p", StringComparison.Ordinal))"#
        ),
        Value::Bool(true)
    );
    assert_eq!(
        eval(r#"@("a.JSON".EndsWith(".json", StringComparison.InvariantCultureIgnoreCase))"#),
        Value::Bool(true)
    );
    assert_eq!(eval(r#"@(true.ToString() + 12.ToString())"#), s("True12"));
    assert_eq!(
        eval(r#"@($"{context.Api.Id}/{1 + 1}:{(context.Response.StatusCode > 400 ? "bad" : "good")} {{}}")"#),
        s("openai/2:bad {}")
    );
    assert_eq!(eval(r#"@($@"C:\{context.Api.Id}\""x""")"#), s(r#"C:\openai\"x""#));
    assert_eq!(eval(r#"@(@"a""b" + "\t\u0041" + 'c')"#), s("a\"b\tAc"));
}

#[test]
fn blocks_with_locals_if_else_and_return() {
    let block = r#"@{
        var user = context.Request.Headers.GetValueOrDefault("x-user", "");
        string tier;
        int limit = 10;
        if (user == "Ada") {
            tier = "gold";
            limit = limit * 10;
        } else if (user == "") tier = "none";
        else { tier = "basic"; }
        // A comment; and a nested block.
        { var suffix = "/" + limit; tier = tier + suffix; }
        return tier;
    }"#;
    assert_eq!(eval(block), s("gold/100"));
    let anonymous = RequestSnapshot { headers: Vec::new(), ..request() };
    assert_eq!(eval_in(block, &anonymous), Ok(s("none/10")));
    assert_eq!(eval(r#"@{ if (context.Subscription.Id == "sub-1") { return 1; } else { return 2; } }"#), Value::Int(1));
}

#[test]
fn block_rules_are_checked_at_compile_time() {
    let e = refused("@{\n  var a = 1;\n  if (a == 1) { return a; }\n}");
    assert!(e.message.contains("can end without `return`"), "{e}");
    let e = refused("@{ var a = 1; var a = 2; return a; }");
    assert!(e.message.contains("`a` is already declared"), "{e}");
    let e = refused("@{ b = 1; return 1; }");
    assert!(e.message.contains("only local variables can be assigned, and `b` is not one"), "{e}");
    let e = refused("@{ var a = 1; a += 1; return a; }");
    assert!(e.message.contains("`+=` is not supported"), "{e}");
    let e = refused("@{ var x; return 1; }");
    assert!(e.message.contains("`var` needs an initial value"), "{e}");
    let e = refused("@{ if (true) { var scoped = 1; } return scoped; }");
    assert!(e.message.contains("`scoped` is not supported"), "{e}");
}

/// The message names the construct, and the position is the construct's own.
#[test]
fn unsupported_constructs_are_refused_with_line_and_column() {
    let cases: &[(&str, Position, &str)] = &[
        ("@(new JObject())", at(1, 3), "`new` (creating objects) is not supported"),
        ("@(context.Product.Name)", at(1, 11), "`context.Product` is not supported"),
        (
            "@(context.Request.MatchedParameters[\"id\"])",
            at(1, 19),
            "`context.Request.MatchedParameters` is not supported",
        ),
        ("@(Convert.ToInt32(\"1\"))", at(1, 3), "`Convert` is not supported"),
        ("@(context.Request.Body.As<string>())", at(1, 27), "`Body.As<string>` is not supported"),
        ("@(\"a\".Substring(1))", at(1, 7), "`.Substring(...)` is not supported"),
        ("@(\"a\".Equals(\"A\", StringComparison.Culture))", at(1, 36), "`StringComparison.Culture` is not a string"),
        (
            "@(string.Format(\"{0}\", StringComparison.Ordinal))",
            at(1, 24),
            "a StringComparison argument is not supported",
        ),
        ("@{\n  string[] documents = null;\n  return 1;\n}", at(2, 3), "locals of type `string[]` are not supported"),
        ("@{\n  List<int> l = null;\n  return 1;\n}", at(2, 3), "locals of generic type `List<...>`"),
        ("@($\"{1:D2}\")", at(1, 6), "format and alignment in interpolation holes (`:D2`) are not supported"),
        ("@(context.Variables[\"a\"] is string)", at(1, 26), "`is` is not supported"),
        ("@(x => x)", at(1, 3), "lambdas (`=>`) are not supported"),
        ("@((JObject)context.Variables[\"a\"])", at(1, 3), "casting to `JObject` is not supported"),
        ("@{\n  foreach (var m in x) { }\n  return 1;\n}", at(2, 3), "`foreach` statements are not supported"),
        (
            "@(context.Variables.GetValueOrDefault<JObject>(\"a\"))",
            at(1, 39),
            "`GetValueOrDefault<JObject>` is not supported",
        ),
        ("@(context.Request)", at(1, 11), "`context.Request` is not a value"),
        ("@(1 2)", at(1, 5), "`2` is not supported here"),
        ("@(a ++ b)", at(1, 3), "`a` is not supported"),
        ("@(\"a\".Contains(\"b\", \"c\"))", at(1, 7), "`.Contains` takes 1 argument(s) here, not 2"),
    ];
    for (src, position, message) in cases {
        let e = refused(src);
        assert!(e.message.contains(message), "{src}: expected `{message}`, got `{}`", e.message);
        assert_eq!(e.position, *position, "{src}: {e}");
    }
}

#[test]
fn positions_are_those_of_the_document() {
    let e = compile_value("  @(context.Api.Id\n    + context.Foo)", at(10, 20)).expect_err("refused");
    assert_eq!(e.position, at(11, 15));
    assert_eq!(e.to_string(), "line 11, column 15: `context.Foo` is not supported in policy expressions");
    assert_eq!(compile_value("plain text", at(1, 1)), Ok(None));
}

#[test]
fn runtime_errors_carry_their_position() {
    let e = eval_in("@(\n(string)context.Variables[\"missing\"])", &request()).expect_err("fails");
    assert_eq!(e.position, at(2, 26));
    assert!(e.message.contains("variable `missing` is not set"), "{e}");
    let anonymous = RequestSnapshot { subscription: None, ..request() };
    let e = eval_in("@(context.Subscription.Id)", &anonymous).expect_err("fails");
    assert!(e.message.contains("context.Subscription is null"), "{e}");
    let before_backend = RequestSnapshot { response_status: None, ..request() };
    assert_eq!(eval_in("@(context.Response?.StatusCode == 429)", &before_backend), Ok(Value::Bool(false)));
    assert!(eval_in("@(context.Response.StatusCode == 429)", &before_backend).is_err());
    let e = eval_in("@(1 / (context.Variables.GetValueOrDefault<int>(\"count\") - 7))", &request()).expect_err("fails");
    assert!(e.message.contains("division by zero"), "{e}");
    let e = eval_in("@(int.Parse(\"x1\"))", &request()).expect_err("fails");
    assert!(e.message.contains("`x1` is not an int"), "{e}");
    let e = eval_in("@((string)context.Variables[\"count\"])", &request()).expect_err("fails");
    assert!(e.message.contains("an int cannot be cast to string"), "{e}");
    let e = eval_in("@(\"a\" + context.Variables.GetValueOrDefault(\"missing\").ToString())", &request())
        .expect_err("fails");
    assert!(e.message.contains("of null"), "{e}");
}

/// Subscription keys and backend secrets are out of reach, however the expression is written.
#[test]
fn expressions_cannot_read_keys() {
    for header in [
        "Ocp-Apim-Subscription-Key",
        "ocp-apim-subscription-key",
        "api-key",
        "API-KEY",
        "x-api-key",
        "Authorization",
        "Cookie",
    ] {
        let e = refused(&format!("@(context.Request.Headers.GetValueOrDefault(\"{header}\", \"\"))"));
        assert!(e.message.contains(&format!("cannot read the `{header}` header")), "{e}");
    }
    for member in ["Key", "PrimaryKey", "SecondaryKey"] {
        let e = refused(&format!("@(context.Subscription.{member})"));
        assert!(e.message.contains("cannot read context.Subscription"), "{e}");
    }
    let e = refused("@(context.Request.Url.Query.GetValueOrDefault(\"subscription-key\"))");
    assert!(e.message.contains("cannot read the `subscription-key` query parameter"), "{e}");
    // A computed name reads as absent, although the request carries the header.
    let computed = r#"@{
        var name = "api" + "-key";
        var auth = "Author" + "ization";
        return context.Request.Headers.GetValueOrDefault(name, "absent") + "|"
            + context.Request.Headers.GetValueOrDefault(auth.ToLower(), "absent") + "|"
            + context.Request.Headers.GetValueOrDefault("Ocp-Apim-" + "Subscription-Key", "absent") + "|"
            + context.Request.Url.Query.GetValueOrDefault("subscription" + "-key", "absent");
    }"#;
    assert_eq!(eval(computed), s("absent|absent|absent|absent"));
}

#[test]
fn hostile_input_is_refused_not_overflowed() {
    let deep = format!("@({}1{})", "(".repeat(1000), ")".repeat(1000));
    let e = refused(&deep);
    assert!(e.message.contains("nests more than"), "{e}");
    let long = format!("@(1{})", " + 1".repeat(3000));
    assert!(refused(&long).message.contains("operations deep"));
    let nots = format!("@({}true)", "!".repeat(1000));
    assert!(refused(&nots).message.contains("nests more than"));
    let holes = format!("@({}1{})", "$\"{".repeat(50), "}\"".repeat(50));
    assert!(refused(&holes).message.contains("nested too deeply"));
    let ifs = format!("@{{ {} return 1; }}", "if (true) ".repeat(500));
    assert!(refused(&ifs).message.contains("nests more than"));
}
