//! Firecracker's OpenAPI (swagger 2.0) document, loaded from YAML at run time, and request
//! validation against it: path templates and methods, the body parameter (required or not),
//! and the body's schema — `$ref`, `type`, `required`, `properties`, `enum`, `minimum`,
//! `maximum`, `items` and `additionalProperties`.
//!
//! Objects without `additionalProperties` are closed: Firecracker deserializes every body
//! with serde's `deny_unknown_fields`, so an unknown field is a 400 there, and here.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Map, Value};

/// One operation of the spec matched by a request.
/// The schema whose objects take unknown fields (see [`Spec::check`]).
const OPEN_SCHEMA: &str = "#/definitions/TokenBucket";

#[derive(Debug, Clone)]
pub struct Operation {
    /// `operationId`, e.g. `putGuestDriveByID`.
    pub id: String,
    /// Path parameters by name (`drive_id` → `rootfs`).
    pub params: Vec<(String, String)>,
    /// The body schema and whether the body is required.
    body: Option<(Value, bool)>,
}

/// The loaded document.
#[derive(Debug)]
pub struct Spec {
    doc: Value,
}

impl Spec {
    /// Reads and parses the YAML file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read spec {}", path.display()))?;
        let yaml: serde_norway::Value = serde_norway::from_str(&text)
            .with_context(|| format!("spec {} is not YAML", path.display()))?;
        let doc = to_json(yaml)?;
        if doc.get("swagger").and_then(Value::as_str) != Some("2.0") {
            bail!("spec {} is not a swagger 2.0 document", path.display());
        }
        if !doc.get("paths").is_some_and(Value::is_object) {
            bail!("spec {} has no paths", path.display());
        }
        Ok(Self { doc })
    }

    /// `info.version`, e.g. `1.17.0-dev`.
    pub fn version(&self) -> &str {
        self.doc
            .pointer("/info/version")
            .and_then(Value::as_str)
            .unwrap_or("0.0.0")
    }

    /// The operation for `method` on `path`, or Firecracker's message for an unknown one.
    pub fn operation(&self, method: &str, path: &str) -> Result<Operation, String> {
        let invalid = || format!("Invalid request method and/or path: {method} {path}.");
        let request: Vec<&str> = path.trim_matches('/').split('/').collect();
        let paths = self.doc["paths"].as_object().ok_or_else(invalid)?;
        for (template, item) in paths {
            let pattern: Vec<&str> = template.trim_matches('/').split('/').collect();
            if pattern.len() != request.len() {
                continue;
            }
            let mut params = Vec::new();
            let matched = pattern.iter().zip(&request).all(|(p, r)| {
                match p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    Some(name) if !r.is_empty() => {
                        params.push((name.to_owned(), (*r).to_owned()));
                        true
                    }
                    Some(_) => false,
                    None => p == r,
                }
            });
            if !matched {
                continue;
            }
            let Some(op) = item.get(method.to_ascii_lowercase()) else {
                return Err(invalid());
            };
            let id = op["operationId"].as_str().unwrap_or_default().to_owned();
            let body = op["parameters"].as_array().and_then(|ps| {
                ps.iter()
                    .find(|p| p["in"] == "body")
                    .map(|p| (p["schema"].clone(), p["required"] == true))
            });
            return Ok(Operation { id, params, body });
        }
        Err(invalid())
    }

    /// Checks `body` (raw bytes) against the operation; returns the parsed body.
    pub fn check_body(&self, op: &Operation, method: &str, body: &[u8]) -> Result<Value, String> {
        let blank = body.iter().all(u8::is_ascii_whitespace);
        let Some((schema, required)) = &op.body else {
            if blank {
                return Ok(Value::Null);
            }
            return Err(format!(
                "{method} request with a body is not accepted here."
            ));
        };
        if blank {
            if *required {
                return Err(format!("Empty {method} request."));
            }
            return Ok(Value::Null);
        }
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            format!("An error occurred when deserializing the json body of a request: {e}.")
        })?;
        self.check(schema, &value, "body").map_err(|e| {
            format!("An error occurred when deserializing the json body of a request: {e}.")
        })?;
        Ok(value)
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> Result<&'a Value, String> {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference
                    .strip_prefix('#')
                    .ok_or_else(|| format!("unsupported $ref {reference}"))?;
                let target = self
                    .doc
                    .pointer(pointer)
                    .ok_or_else(|| format!("dangling $ref {reference}"))?;
                self.resolve(target)
            }
            None => Ok(schema),
        }
    }

    /// Validates `value` against `schema`; `at` names the place for messages.
    pub fn check(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        // Firecracker's rate-limiter buckets (`TokenBucketConfig`) are the one body type
        // deserialized without `deny_unknown_fields`: unknown fields inside them pass.
        if schema.get("$ref").and_then(Value::as_str) == Some(OPEN_SCHEMA) {
            let resolved = self.resolve(schema)?;
            let properties = resolved.get("properties").and_then(Value::as_object);
            let object = value
                .as_object()
                .ok_or_else(|| format!("invalid type: {}, expected a map at {at}", shown(value)))?;
            for (key, field) in object {
                if let Some(field_schema) = properties.and_then(|p| p.get(key)) {
                    self.check(field_schema, field, &format!("{at}.{key}"))?;
                }
            }
            return Ok(());
        }
        let schema = self.resolve(schema)?;
        let kind = schema.get("type").and_then(Value::as_str).or_else(|| {
            schema
                .get("properties")
                .map(|_| "object")
                .or_else(|| schema.get("additionalProperties").map(|_| "object"))
        });
        match kind {
            Some("object") => self.check_object(schema, value, at)?,
            Some(scalar @ ("string" | "integer" | "number" | "boolean")) => {
                let (ok, expected) = match scalar {
                    "string" => (value.is_string(), "a string"),
                    "integer" => (value.is_i64() || value.is_u64(), "an integer"),
                    "number" => (value.is_number(), "a number"),
                    _ => (value.is_boolean(), "a boolean"),
                };
                if !ok {
                    return Err(format!(
                        "invalid type: {}, expected {expected} at {at}",
                        shown(value)
                    ));
                }
            }
            Some("array") => {
                let items = value.as_array().ok_or_else(|| {
                    format!(
                        "invalid type: {}, expected a sequence at {at}",
                        shown(value)
                    )
                })?;
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item_schema, item, &format!("{at}[{i}]"))?;
                    }
                }
            }
            Some(other) => return Err(format!("spec uses unsupported type {other} at {at}")),
            None => {}
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            let names: Vec<String> = allowed.iter().map(|v| format!("`{}`", plain(v))).collect();
            return Err(format!(
                "unknown variant `{}`, expected one of {} at {at}",
                plain(value),
                names.join(", ")
            ));
        }
        if let Some(number) = value.as_f64() {
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && number < min
            {
                return Err(format!("{at} is {number}, below the minimum {min}"));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && number > max
            {
                return Err(format!("{at} is {number}, above the maximum {max}"));
            }
        }
        Ok(())
    }

    fn check_object(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let object = value
            .as_object()
            .ok_or_else(|| format!("invalid type: {}, expected a map at {at}", shown(value)))?;
        let empty = Map::new();
        let properties = schema
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(name) {
                return Err(format!("missing field `{name}` at {at}"));
            }
        }
        for (key, field) in object {
            let place = format!("{at}.{key}");
            match properties.get(key) {
                Some(field_schema) => self.check(field_schema, field, &place)?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(true)) => {}
                    Some(extra) if extra.is_object() => self.check(extra, field, &place)?,
                    _ => {
                        let expected: Vec<String> =
                            properties.keys().map(|k| format!("`{k}`")).collect();
                        return Err(format!(
                            "unknown field `{key}`, expected one of {} at {at}",
                            expected.join(", ")
                        ));
                    }
                },
            }
        }
        Ok(())
    }
}

/// A JSON value as serde names it in type errors.
fn shown(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".into(),
        Value::Object(_) => "map".into(),
    }
}

fn plain(value: &Value) -> String {
    value
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| value.to_string())
}

/// YAML → JSON. Mapping keys become strings: the spec's response codes (`200:`) are integers.
fn to_json(yaml: serde_norway::Value) -> anyhow::Result<Value> {
    use serde_norway::Value as Y;
    Ok(match yaml {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => {
            Value::Array(items.into_iter().map(to_json).collect::<Result<_, _>>()?)
        }
        Y::Mapping(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                let key = match key {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => bail!("unsupported mapping key {other:?}"),
                };
                out.insert(key, to_json(value)?);
            }
            Value::Object(out)
        }
        Y::Tagged(tagged) => to_json(tagged.value)?,
    })
}
