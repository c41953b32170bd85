//! A small cursor over `serde_yaml::Value` that knows its field path, so every
//! validation message can say exactly where the problem is
//! (`spec.rules[0].from[0].source.ipBlocks[1]`). It owns the generic checks (unknown
//! fields, types, empty strings); what a field means is [`super::parse`]'s business.

use serde_yaml::{Mapping, Value};

use super::parse::Problem;

/// A problem and where it is, before the object's name is attached.
#[derive(Debug)]
pub struct FieldError {
    pub path: String,
    pub problem: Problem,
}

pub type Res<T> = Result<T, FieldError>;

/// A value and its path from the document root.
pub struct Node<'a> {
    pub value: &'a Value,
    pub path: String,
}

impl<'a> Node<'a> {
    pub fn fail<T>(&self, problem: Problem) -> Res<T> {
        Err(FieldError {
            path: self.path.clone(),
            problem,
        })
    }

    fn wrong_type<T>(&self, expected: &'static str) -> Res<T> {
        self.fail(Problem::WrongType {
            expected,
            found: type_name(self.value),
        })
    }

    /// The node as a mapping whose keys are all in `allowed`.
    pub fn fields(&self, allowed: &'static [&'static str]) -> Res<Fields<'a, '_>> {
        let Value::Mapping(map) = self.value else {
            return self.wrong_type("a mapping");
        };
        for key in map.keys() {
            let Value::String(key) = key else {
                return self.fail(Problem::WrongType {
                    expected: "string keys",
                    found: type_name(key),
                });
            };
            if !allowed.contains(&key.as_str()) {
                return Err(FieldError {
                    path: join(&self.path, key),
                    problem: Problem::UnknownField { allowed },
                });
            }
        }
        Ok(Fields {
            map,
            path: &self.path,
        })
    }

    /// The node as a mapping whose keys are not checked (`metadata`, where Kubernetes
    /// adds fields of its own).
    pub fn open_fields(&self) -> Res<Fields<'a, '_>> {
        let Value::Mapping(map) = self.value else {
            return self.wrong_type("a mapping");
        };
        Ok(Fields {
            map,
            path: &self.path,
        })
    }

    /// A non-empty string.
    pub fn string(&self) -> Res<&'a str> {
        match self.value {
            Value::String(s) if s.is_empty() => self.fail(Problem::Empty),
            Value::String(s) => Ok(s),
            _ => self.wrong_type("a string"),
        }
    }

    pub fn boolean(&self) -> Res<bool> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            _ => self.wrong_type("a boolean"),
        }
    }

    /// The items of a list with their paths (`path[i]`).
    pub fn items(&self) -> Res<Vec<Node<'a>>> {
        let Value::Sequence(seq) = self.value else {
            return self.wrong_type("a list");
        };
        Ok(seq
            .iter()
            .enumerate()
            .map(|(i, value)| Node {
                value,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    /// The entries of a mapping whose keys are free-form (labels, ports).
    pub fn entries(&self) -> Res<Vec<(&'a Value, Node<'a>)>> {
        let Value::Mapping(map) = self.value else {
            return self.wrong_type("a mapping");
        };
        Ok(map
            .iter()
            .map(|(key, value)| {
                let name = match key {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => type_name(other).to_owned(),
                };
                (
                    key,
                    Node {
                        value,
                        path: format!("{}[{name}]", self.path),
                    },
                )
            })
            .collect())
    }
}

/// A checked mapping: every key is known.
pub struct Fields<'a, 'p> {
    map: &'a Mapping,
    path: &'p str,
}

impl<'a> Fields<'a, '_> {
    /// The field, if present and not null (Kubernetes treats `field: null` as absent).
    pub fn get(&self, key: &str) -> Option<Node<'a>> {
        self.map
            .get(key)
            .filter(|v| !v.is_null())
            .map(|value| Node {
                value,
                path: join(self.path, key),
            })
    }

    /// True when the key is written, even with a null value (`mtls:` in Istio 1.1's
    /// authentication policy means "mTLS with defaults", not "no mTLS").
    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The field or a `Missing` error naming it.
    pub fn require(&self, key: &str) -> Res<Node<'a>> {
        self.get(key).ok_or_else(|| self.missing(key))
    }

    /// The error for a required field that is absent.
    pub fn missing(&self, key: &str) -> FieldError {
        FieldError {
            path: join(self.path, key),
            problem: Problem::Missing,
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}
