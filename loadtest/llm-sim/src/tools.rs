//! Tool calling: which function to call and schema-satisfying arguments.

use serde_json::{Map, Value};

use crate::answer::SplitMix;
use crate::api::ApiError;

/// Where a request keeps a function tool's `name` and `parameters`.
#[derive(Clone, Copy)]
pub enum Shape {
    /// Chat completions: `{"type":"function","function":{"name":...,"parameters":...}}`.
    Chat,
    /// Responses: `{"type":"function","name":...,"parameters":...}`.
    Responses,
}

impl Shape {
    /// The object holding the tool's `name` and `parameters`, and its path for error messages.
    fn function(self, tool: &Value, i: usize) -> (Option<&Value>, String) {
        match self {
            Self::Chat => (tool.get("function"), format!("tools[{i}].function")),
            Self::Responses => (Some(tool), format!("tools[{i}]")),
        }
    }
}

/// A function entry of `tools`.
pub struct FunctionTool<'a> {
    pub name: &'a str,
    parameters: Option<&'a Value>,
}

pub enum ToolChoice<'a> {
    /// `"none"`: answer with text even though tools are offered.
    None,
    /// `"auto"`, `"required"` or absent: the sim always calls a tool.
    Auto,
    /// `{"type":"function","function":{"name":...}}` (chat) or `{"type":"function","name":...}`
    /// (Responses).
    Named(&'a str),
}

pub fn parse_tools(tools: Option<&Value>, shape: Shape) -> Result<Vec<FunctionTool<'_>>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        // The Responses API takes `[]` for no tools (the Agents SDK sends it); chat refuses it.
        Some(Value::Array(list)) if list.is_empty() && matches!(shape, Shape::Chat) => {
            return Err(ApiError::invalid_request(
                "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            )
            .param("tools")
            .code("empty_array"));
        }
        Some(Value::Array(list)) => list,
        Some(other) => return Err(ApiError::invalid_type("tools", "an array", other)),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        // Non-function tools (e.g. `custom`, `web_search`) are accepted but never chosen.
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            continue;
        }
        let (function, path) = shape.function(tool, i);
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::missing(format!("{path}.name")))?;
        out.push(FunctionTool { name, parameters: function.and_then(|f| f.get("parameters")) });
    }
    Ok(out)
}

pub fn parse_tool_choice(choice: Option<&Value>, shape: Shape) -> Result<ToolChoice<'_>, ApiError> {
    match choice {
        None | Some(Value::Null) => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" | "required" => Ok(ToolChoice::Auto),
            _ => Err(ApiError::invalid_request(format!(
                "Invalid value: '{s}'. Supported values are: 'none', 'auto', and 'required'."
            ))
            .param("tool_choice")
            .code("invalid_value")),
        },
        Some(obj @ Value::Object(_)) => match obj.get("type").and_then(Value::as_str) {
            None | Some("function") => named(obj, shape),
            Some("allowed_tools") => Ok(ToolChoice::Auto),
            // A hosted tool (`{"type":"web_search"}`, ...) is never called: the answer is text.
            Some(_) => Ok(ToolChoice::None),
        },
        Some(other) => Err(ApiError::invalid_type("tool_choice", "a string or an object", other)),
    }
}

fn named(obj: &Value, shape: Shape) -> Result<ToolChoice<'_>, ApiError> {
    let (function, path) = match shape {
        Shape::Chat => (obj.get("function"), "tool_choice.function.name"),
        Shape::Responses => (Some(obj), "tool_choice.name"),
    };
    function
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
        .map(ToolChoice::Named)
        .ok_or_else(|| ApiError::missing(path))
}

/// The named tool, else the first tool mentioned in the user's message, else
/// the first tool.
pub fn select<'t, 'a>(
    tools: &'t [FunctionTool<'a>],
    choice: &ToolChoice<'_>,
    user_text: &str,
) -> Result<&'t FunctionTool<'a>, ApiError> {
    if let ToolChoice::Named(name) = choice {
        return tools.iter().find(|t| t.name == *name).ok_or_else(|| {
            ApiError::invalid_request(format!(
                "Invalid value for 'tool_choice': tool choice '{name}' not found in 'tools' parameter."
            ))
            .param("tool_choice")
        });
    }
    tools
        .iter()
        .find(|t| user_text.contains(t.name))
        .or_else(|| tools.first())
        .ok_or_else(|| ApiError::invalid_request("'tools' contains no function tools.").param("tools"))
}

/// Serialized arguments satisfying the tool's `parameters` schema.
pub fn arguments(tool: &FunctionTool<'_>, user_text: &str, seed: u64) -> String {
    let mut generator = ArgGen::new(user_text, seed);
    let value = match tool.parameters {
        Some(schema) => generator.value(schema),
        None => Value::Object(Map::new()),
    };
    value.to_string()
}

/// Walks a JSON schema producing a value for every listed property.
struct ArgGen<'u> {
    words: Vec<&'u str>,
    rng: SplitMix,
}

impl<'u> ArgGen<'u> {
    fn new(user_text: &'u str, seed: u64) -> Self {
        let words = user_text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
        Self { words, rng: SplitMix::new(seed) }
    }

    fn word(&mut self) -> Value {
        if self.words.is_empty() {
            return Value::String("simulated".to_owned());
        }
        let i = (self.rng.next_u64() % self.words.len() as u64) as usize;
        Value::String(self.words[i].to_owned())
    }

    fn value(&mut self, schema: &Value) -> Value {
        let Some(s) = schema.as_object() else {
            // `true` / `{}`-like schemas accept anything.
            return self.word();
        };
        if let Some(c) = s.get("const") {
            return c.clone();
        }
        if let Some(first) = s.get("enum").and_then(Value::as_array).and_then(|e| e.first()) {
            return first.clone();
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(first) = s.get(key).and_then(Value::as_array).and_then(|v| v.first()) {
                return self.value(first);
            }
        }
        let ty = match s.get("type") {
            Some(Value::String(t)) => t.as_str(),
            // ["string", "null"]: produce the non-null alternative.
            Some(Value::Array(types)) => {
                types.iter().filter_map(Value::as_str).find(|t| *t != "null").unwrap_or("null")
            }
            _ if s.contains_key("properties") => "object",
            _ if s.contains_key("items") => "array",
            _ => "string",
        };
        match ty {
            "object" => self.object(s),
            "array" => {
                let n = s.get("minItems").and_then(Value::as_u64).unwrap_or(1).max(1);
                let items = s.get("items").unwrap_or(&Value::Bool(true));
                Value::Array((0..n).map(|_| self.value(items)).collect())
            }
            "integer" => Value::from(clamp(42.0, s) as i64),
            "number" => Value::from(clamp(4.2, s)),
            "boolean" => Value::Bool(true),
            "null" => Value::Null,
            _ => self.word(),
        }
    }

    fn object(&mut self, s: &Map<String, Value>) -> Value {
        let mut out = Map::new();
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (name, sub) in props {
                let v = self.value(sub);
                out.insert(name.clone(), v);
            }
        }
        // Required names without a property schema still must be present.
        if let Some(required) = s.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if !out.contains_key(name) {
                    let v = self.word();
                    out.insert(name.to_owned(), v);
                }
            }
        }
        Value::Object(out)
    }
}

/// Keeps the default inside `minimum`/`maximum` when the schema bounds it.
fn clamp(default: f64, s: &Map<String, Value>) -> f64 {
    let mut v = default;
    if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
        v = v.max(min);
    }
    if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
        v = v.min(max);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools_json() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 100},
                    "ratio": {"type": "number"},
                    "verbose": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "window": {"type": "object", "properties": {
                        "from": {"type": "string"},
                        "points": {"type": "array", "minItems": 2, "items": {
                            "type": "object",
                            "properties": {"x": {"type": "number"}, "y": {"type": ["integer", "null"]}},
                            "required": ["x", "y", "label"]
                        }}
                    }, "required": ["from"]}
                },
                "required": ["location", "unit"]
            }}},
            {"type": "function", "function": {"name": "search_docs"}}
        ])
    }

    #[test]
    fn arguments_satisfy_nested_schema() {
        let tools_v = tools_json();
        let tools = parse_tools(Some(&tools_v), Shape::Chat).expect("valid tools");
        let user = "What is the weather in Paris";
        let args: Value = serde_json::from_str(&arguments(&tools[0], user, 7)).expect("arguments are JSON");

        let user_words: Vec<&str> = user.split(' ').collect();
        let location = args["location"].as_str().expect("location is a string");
        assert!(user_words.contains(&location), "{location} from the prompt");
        assert_eq!(args["unit"], "celsius");
        assert_eq!(args["days"], 100, "minimum respected");
        assert_eq!(args["ratio"], 4.2);
        assert_eq!(args["verbose"], true);
        let tags = args["tags"].as_array().expect("tags array");
        assert_eq!(tags.len(), 1);
        assert!(tags[0].is_string());
        let window = &args["window"];
        assert!(window["from"].is_string());
        let points = window["points"].as_array().expect("points array");
        assert_eq!(points.len(), 2, "minItems respected");
        for p in points {
            assert_eq!(p["x"], 4.2);
            assert_eq!(p["y"], 42);
            assert!(p["label"].is_string(), "required-only property present");
        }
        // Same inputs, same arguments.
        assert_eq!(arguments(&tools[0], user, 7), arguments(&tools[0], user, 7));
        // No parameters: an empty object.
        assert_eq!(arguments(&tools[1], user, 7), "{}");
    }

    #[test]
    fn selection_order() {
        let tools_v = tools_json();
        let tools = parse_tools(Some(&tools_v), Shape::Chat).expect("valid tools");
        let auto = ToolChoice::Auto;
        assert_eq!(select(&tools, &auto, "hello").map(|t| t.name).ok(), Some("get_weather"));
        assert_eq!(select(&tools, &auto, "please search_docs now").map(|t| t.name).ok(), Some("search_docs"));
        let named = ToolChoice::Named("search_docs");
        assert_eq!(select(&tools, &named, "get_weather").map(|t| t.name).ok(), Some("search_docs"));
        assert!(select(&tools, &ToolChoice::Named("nope"), "").is_err());
    }

    #[test]
    fn tool_choice_parsing() {
        assert!(matches!(parse_tool_choice(Some(&json!("none")), Shape::Chat), Ok(ToolChoice::None)));
        assert!(matches!(parse_tool_choice(Some(&json!("required")), Shape::Chat), Ok(ToolChoice::Auto)));
        assert!(matches!(
            parse_tool_choice(Some(&json!({"type": "function", "function": {"name": "f"}})), Shape::Chat),
            Ok(ToolChoice::Named("f"))
        ));
        assert!(parse_tool_choice(Some(&json!("sometimes")), Shape::Chat).is_err());
        assert!(parse_tools(Some(&json!([])), Shape::Chat).is_err());
    }

    #[test]
    fn responses_shape() {
        let flat = json!([
            {"type": "web_search"},
            {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
        ]);
        let tools = parse_tools(Some(&flat), Shape::Responses).expect("valid tools");
        assert_eq!(tools.len(), 1, "hosted tools are never chosen");
        assert_eq!(tools[0].name, "get_weather");
        let args: Value = serde_json::from_str(&arguments(&tools[0], "in Paris", 1)).expect("arguments are JSON");
        assert!(args["city"].is_string());
        let Err(err) = parse_tools(Some(&json!([{"type": "function"}])), Shape::Responses) else {
            panic!("a function tool without a name is refused");
        };
        assert!(format!("{err:?}").contains("Some(\"tools[0].name\")"), "{err:?}");
        assert!(parse_tools(Some(&json!([])), Shape::Responses).is_ok_and(|t| t.is_empty()));
        assert!(matches!(
            parse_tool_choice(Some(&json!({"type": "function", "name": "f"})), Shape::Responses),
            Ok(ToolChoice::Named("f"))
        ));
        assert!(matches!(
            parse_tool_choice(Some(&json!({"type": "web_search"})), Shape::Responses),
            Ok(ToolChoice::None)
        ));
        assert!(matches!(
            parse_tool_choice(Some(&json!({"type": "allowed_tools", "mode": "auto", "tools": []})), Shape::Responses),
            Ok(ToolChoice::Auto)
        ));
    }
}
