//! The lenient document reader: real-world forms that strict XML parsers refuse, positions,
//! named values, placeholders, fragments and errors.

use std::collections::HashMap;

use apim_policy::document::NoFragments;
use apim_policy::{Document, Element, FragmentLoader, Node, Position, ReadError, Sources};

fn at(line: u32, column: u32) -> Position {
    Position { line, column }
}

fn read_with(src: &str, named_values: &[(&str, &str)], fragments: &dyn FragmentLoader) -> Result<Document, ReadError> {
    let named_values: HashMap<String, String> =
        named_values.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let placeholders = HashMap::from([("backend-id".to_string(), "pool-1".to_string())]);
    Document::read(src, &Sources { named_values: &named_values, placeholders: &placeholders, fragments })
}

fn read(src: &str) -> Document {
    read_with(src, &[], &NoFragments).unwrap_or_else(|e| panic!("{e}"))
}

fn read_error(src: &str) -> ReadError {
    read_with(src, &[], &NoFragments).expect_err("the document is refused")
}

fn first<'e>(e: &'e Element, name: &str) -> &'e Element {
    e.elements().find(|c| c.name == name).unwrap_or_else(|| panic!("no <{name}> under <{}>", e.name))
}

#[test]
fn raw_quotes_inside_a_quoted_attribute_expression() {
    let doc = read(
        r#"<policies><set-variable name="x" value="@(context.Request.Headers.GetValueOrDefault("x", ""))" /></policies>"#,
    );
    let set = first(&doc.root, "set-variable");
    let value = set.attribute("value").expect("value attribute");
    assert_eq!(value.value, r#"@(context.Request.Headers.GetValueOrDefault("x", ""))"#);
    assert_eq!(value.value_position, at(1, 41));
    assert_eq!(set.attribute("name").map(|a| a.value.as_str()), Some("x"));
}

#[test]
fn raw_angle_brackets_from_generics_and_comparisons() {
    let src = concat!(
        "<policies>\n",
        "  <when condition=\"@(context.Request.Body.As<JObject>(preserveContent: true)[\"n\"].ToString().Length < 3)\">\n",
        "    <value>@(context.Variables.GetValueOrDefault<int>(\"n\") <= 2 ? \"<small>\" : \"big>\")</value>\n",
        "    <set-body>a < b and c</set-body>\n",
        "  </when>\n",
        "</policies>\n",
    );
    let doc = read(src);
    let when = first(&doc.root, "when");
    assert_eq!(
        when.attribute("condition").map(|a| a.value.as_str()),
        Some(r#"@(context.Request.Body.As<JObject>(preserveContent: true)["n"].ToString().Length < 3)"#)
    );
    let value = first(when, "value").text().expect("text");
    assert_eq!(value.value, r#"@(context.Variables.GetValueOrDefault<int>("n") <= 2 ? "<small>" : "big>")"#);
    assert_eq!(value.position, at(3, 12));
    assert_eq!(first(when, "set-body").text().map(|t| t.value.as_str()), Some("a < b and c"));
}

#[test]
fn multi_statement_blocks_with_strings_comments_and_chars_that_look_like_ends() {
    let block = r#"@{
        // a comment with " and ) and } in it
        /* and "another" one ) */
        var s = "}\")" + @"verbatim ""quoted"" }" + '"' + $"{(1 > 0 ? "}" : "{")} {{ not a named value }}";
        if (s.Contains("\"")) { return s; }
        return "none";
    }"#;
    let src =
        format!("<policies>\n<set-variable name=\"b\" value=\"{block}\" />\n<set-body>{block}</set-body>\n</policies>");
    let doc = read(&src);
    assert_eq!(first(&doc.root, "set-variable").attribute("value").map(|a| a.value.as_str()), Some(block));
    assert_eq!(first(&doc.root, "set-body").text().map(|t| t.value.as_str()), Some(block));
}

#[test]
fn every_node_has_its_line_and_column() {
    let src = "<policies>\n  <inbound>\n    <base />\n    <set-header name=\"h\"\n        exists-action=\"override\">\n      <value>v</value>\n    </set-header>\n  </inbound>\n</policies>";
    let doc = read(src);
    assert_eq!(doc.root.position, at(1, 1));
    let inbound = first(&doc.root, "inbound");
    assert_eq!(inbound.position, at(2, 3));
    let base = first(inbound, "base");
    assert_eq!((base.position, base.children.len(), base.attributes.len()), (at(3, 5), 0, 0));
    let header = first(inbound, "set-header");
    assert_eq!(header.position, at(4, 5));
    let action = header.attribute("exists-action").expect("exists-action");
    assert_eq!((action.position, action.value_position), (at(5, 9), at(5, 24)));
    assert_eq!(first(header, "value").text().map(|t| t.position), Some(at(6, 14)));
}

#[test]
fn entities_are_decoded_including_inside_well_formed_expressions() {
    let doc = read(
        r#"<policies><when condition="@(context.Variables.GetValueOrDefault&lt;string&gt;(&quot;a&quot;) == &quot;x)&quot;)"><set-body>&lt;b&gt; &amp; &#65;&#x42;</set-body></when></policies>"#,
    );
    let when = first(&doc.root, "when");
    assert_eq!(
        when.attribute("condition").map(|a| a.value.as_str()),
        Some(r#"@(context.Variables.GetValueOrDefault<string>("a") == "x)")"#)
    );
    assert_eq!(first(when, "set-body").text().map(|t| t.value.as_str()), Some("<b> & AB"));
}

#[test]
fn comments_cdata_and_processing_instructions() {
    let doc = read(
        "<?xml version=\"1.0\"?>\n<!-- a <policies> comment -->\n<policies><!-- <inbound> --><set-body><![CDATA[<raw> & \"text\"]]></set-body></policies>",
    );
    assert_eq!(doc.root.elements().count(), 1);
    assert_eq!(first(&doc.root, "set-body").text().map(|t| t.value.as_str()), Some("<raw> & \"text\""));
}

#[test]
fn named_values_and_placeholders_are_resolved() {
    let src = r#"<policies><set-backend-service backend-id="{backend-id}" base-url="{{url}}/v1" /><set-body>{{greeting}}, {id}</set-body></policies>"#;
    let doc = read_with(src, &[("url", "http://127.0.0.1:9"), ("greeting", "hello")], &NoFragments).expect("reads");
    let backend = first(&doc.root, "set-backend-service");
    assert_eq!(backend.attribute("backend-id").map(|a| a.value.as_str()), Some("pool-1"));
    assert_eq!(backend.attribute("base-url").map(|a| a.value.as_str()), Some("http://127.0.0.1:9/v1"));
    // `{id}` is no placeholder of ours: URI templates write parameters that way, so it stays.
    assert_eq!(first(&doc.root, "set-body").text().map(|t| t.value.as_str()), Some("hello, {id}"));
}

#[test]
fn a_missing_named_value_is_named_with_its_position() {
    let e =
        read_with("<policies>\n  <set-variable name=\"a\" value=\"x{{tenant-id}}\" />\n</policies>", &[], &NoFragments)
            .expect_err("refused");
    assert_eq!(e.position, at(2, 34));
    assert!(e.message.contains("named value `tenant-id` is not defined"), "{e}");
    assert!(e.to_string().starts_with("line 2, column 34: "), "{e}");
}

#[test]
fn liquid_templates_keep_their_double_braces() {
    let doc = read(r#"<policies><set-body template="liquid">{"model": "{{body.model}}"}</set-body></policies>"#);
    assert_eq!(first(&doc.root, "set-body").text().map(|t| t.value.as_str()), Some(r#"{"model": "{{body.model}}"}"#));
}

struct Fragments(HashMap<&'static str, &'static str>);

impl FragmentLoader for Fragments {
    fn load(&self, id: &str) -> Result<String, String> {
        self.0.get(id).map(|s| s.to_string()).ok_or_else(|| "it is not in the fragments directory".to_string())
    }
}

#[test]
fn fragments_are_included_in_place_and_keep_their_origin() {
    let fragments = Fragments(HashMap::from([
        ("auth", "<fragment>\n  <base />\n  <include-fragment fragment-id=\"header\" />\n</fragment>"),
        ("header", "<fragment><set-header name=\"h\"><value>@(\"v\")</value></set-header></fragment>"),
    ]));
    let doc = read_with(
        "<policies><inbound><include-fragment fragment-id=\"auth\" /><set-backend-service backend-id=\"b\" /></inbound></policies>",
        &[],
        &fragments,
    )
    .expect("reads");
    let inbound = first(&doc.root, "inbound");
    let names: Vec<&str> = inbound.elements().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["base", "set-header", "set-backend-service"]);
    let base = first(inbound, "base");
    assert_eq!((base.fragment.as_deref(), base.position), (Some("auth"), at(2, 3)));
    assert_eq!(first(inbound, "set-header").fragment.as_deref(), Some("header"));
    assert_eq!(first(inbound, "set-backend-service").fragment, None);
}

#[test]
fn fragment_errors_name_the_fragment() {
    let fragments = Fragments(HashMap::from([
        ("a", "<fragment><include-fragment fragment-id=\"b\" /></fragment>"),
        ("b", "<fragment><include-fragment fragment-id=\"a\" /></fragment>"),
        ("broken", "<fragment>\n<value>@(\"x\"</value></fragment>"),
        ("policies", "<policies />"),
    ]));
    let include = |id: &str| {
        read_with(&format!("<policies><include-fragment fragment-id=\"{id}\" /></policies>"), &[], &fragments)
            .expect_err("refused")
    };
    let cycle = include("a");
    assert!(cycle.message.contains("fragment `a` includes itself (through a → b)"), "{cycle}");
    let missing = include("nope");
    assert!(
        missing.message.contains("fragment `nope` cannot be loaded: it is not in the fragments directory"),
        "{missing}"
    );
    assert_eq!(missing.position, at(1, 11));
    let broken = include("broken");
    assert_eq!((broken.fragment.as_deref(), broken.position), (Some("broken"), at(2, 8)));
    assert!(broken.to_string().starts_with("fragment `broken`, line 2, column 8: "), "{broken}");
    assert!(include("policies").message.contains("a fragment's root element must be `<fragment>`"));
}

#[test]
fn structural_errors_say_where_and_what_to_do() {
    let unclosed = read_error("<policies>\n  <inbound>\n</policies>");
    assert_eq!(unclosed.position, at(3, 3));
    assert!(
        unclosed.message.contains("`</policies>` closes `<inbound>` opened at line 2, column 3: expected `</inbound>`"),
        "{unclosed}"
    );

    let never = read_error("<policies>\n  <when condition=\"@(context.Variables.ContainsKey(\"x\")\" />\n</policies>");
    assert_eq!(never.position, at(2, 20));
    assert!(never.message.contains("does not end where it should: this string is never closed on its line"), "{never}");
    assert!(never.message.contains("at line 2, column 56"), "{never}");

    let open = read_error("<policies><value>@(context.Variables[\"x\"]</value></policies>");
    assert!(open.message.contains("never closed: add the matching `)`"), "{open}");

    let mismatched = read_error(r#"<policies><when condition="@(a[1)" /></policies>"#);
    assert!(
        mismatched.message.contains("`)` does not match the bracket opened at line 1, column 31: expected `]`"),
        "{mismatched}"
    );

    let trailing = read_error(r#"<policies><when condition="@(a) and more" /></policies>"#);
    assert!(trailing.message.contains("a policy expression must be the whole value"), "{trailing}");

    let duplicate = read_error(r#"<policies><base a="1" a="2" /></policies>"#);
    assert!(duplicate.message.contains("attribute `a` appears twice on `<base>`"), "{duplicate}");

    let two_roots = read_error("<policies /><policies />");
    assert!(two_roots.message.contains("only one root element is allowed"), "{two_roots}");

    let string = read_error("<policies><value>@(\"never closed)</value></policies>");
    assert!(string.message.contains("string is never closed"), "{string}");
}

#[test]
fn hostile_nesting_is_refused_not_overflowed() {
    let deep = "<a>".repeat(10_000);
    assert!(read_error(&deep).message.contains("nested more than"));
}

#[test]
fn the_reference_policy_reads_as_published() {
    let src = include_str!("../../../policies/apim/reference-aoai-policy.xml");
    let doc = read(src);
    let inbound = first(&doc.root, "inbound");
    let names: Vec<&str> = inbound.elements().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "base",
            "authentication-managed-identity",
            "set-header",
            "azure-openai-token-limit",
            "azure-openai-semantic-cache-lookup",
            "set-backend-service",
            "azure-openai-emit-token-metric",
        ]
    );
    let limit = first(inbound, "azure-openai-token-limit");
    assert_eq!(
        limit.attribute("counter-key").map(|a| a.value.as_str()),
        Some(r#"@(context.Subscription?.Id ?? "anonymous")"#)
    );
    let dimensions: Vec<&str> = first(inbound, "azure-openai-emit-token-metric")
        .elements()
        .filter_map(|d| d.attribute("name").map(|a| a.value.as_str()))
        .collect();
    assert_eq!(dimensions, ["Subscription ID", "API ID", "Operation ID", "Client IP"]);
    let outbound = first(&doc.root, "outbound");
    assert!(
        matches!(outbound.children.as_slice(), [Node::Element(b), Node::Element(s)] if b.name == "base" && s.name == "azure-openai-semantic-cache-store")
    );
}
