//! Label selectors, as kubectl's: `key=value` (`==`), `key!=value`, `key`, `!key`, `key in (a,b)`,
//! `key notin (a,b)`, comma-separated (all must match).

use std::collections::BTreeMap;
use std::fmt;

use crate::resources::validate::{validate_key, validate_label};

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

/// A selector that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError(pub String);

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unable to parse requirement: {}", self.0)
    }
}

impl std::error::Error for SelectorError {}

/// Splits at the commas that are not inside parentheses (`a in (x,y),b` is two parts).
fn parts(s: &str) -> Result<Vec<&str>, SelectorError> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| SelectorError(format!("{s:?}: unmatched ')'")))?
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err(SelectorError(format!("{s:?}: unclosed '('")));
    }
    out.push(&s[start..]);
    Ok(out
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect())
}

/// `key in (a, b)` or `key notin (a, b)`; `None` for a part without parentheses.
fn set_based(part: &str) -> Option<Result<Requirement, SelectorError>> {
    let open = part.find('(')?;
    let head = part[..open].trim_end();
    let (key, negated) = if let Some(k) = head.strip_suffix(" notin") {
        (k, true)
    } else if let Some(k) = head.strip_suffix(" in") {
        (k, false)
    } else {
        return Some(Err(SelectorError(format!(
            "{part:?}: expected KEY in (VALUES) or KEY notin (VALUES)"
        ))));
    };
    let Some(inner) = part[open + 1..].strip_suffix(')') else {
        return Some(Err(SelectorError(format!(
            "{part:?}: nothing may follow the closing ')'"
        ))));
    };
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    // `()` or `(a,)`: an empty item is not a value anyone meant (kubectl refuses it too).
    if values.iter().any(String::is_empty) {
        return Some(Err(SelectorError(format!(
            "{part:?}: a set needs values, none of them empty"
        ))));
    }
    let key = key.trim().to_string();
    Some(Ok(if negated {
        Requirement::NotIn(key, values)
    } else {
        Requirement::In(key, values)
    }))
}

impl Selector {
    /// Parses `app=x,tier!=y,team,!legacy,zone in (a,b),env notin (dev)`; `==` is accepted for
    /// `=`. Keys and values follow the rules of labels, so a selector that no label could match
    /// is an error rather than an empty answer.
    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        let mut reqs = Vec::new();
        for part in parts(s)? {
            let req = if let Some(r) = set_based(part) {
                r?
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            let (key, values): (&String, Vec<&String>) = match &req {
                Requirement::Equals(k, v) | Requirement::NotEquals(k, v) => (k, vec![v]),
                Requirement::Exists(k) | Requirement::NotExists(k) => (k, Vec::new()),
                Requirement::In(k, vs) | Requirement::NotIn(k, vs) => (k, vs.iter().collect()),
            };
            validate_key(key).map_err(|e| SelectorError(format!("{part:?}: {e}")))?;
            for v in values {
                validate_label(key, v).map_err(|e| SelectorError(format!("{part:?}: {e}")))?;
            }
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    /// True when every requirement holds for `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_requirement_must_hold() {
        let s = Selector::parse("team=core,tier!=gpu,owner,!legacy").unwrap();
        assert!(s.matches(&labels(&[("team", "core"), ("owner", "x")])));
        assert!(!s.matches(&labels(&[("team", "core")])));
        assert!(!s.matches(&labels(&[
            ("team", "core"),
            ("owner", "x"),
            ("tier", "gpu")
        ])));
        assert!(!s.matches(&labels(&[("team", "core"), ("owner", "x"), ("legacy", "")])));
        assert!(Selector::parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn a_malformed_key_is_an_error() {
        assert!(Selector::parse("a b=c").is_err());
        assert!(Selector::parse("=c").is_err());
    }

    #[test]
    fn set_based_requirements_match_as_kubectls() {
        let s = Selector::parse("team in (core, infra),tier notin (gpu),owner").unwrap();
        assert!(s.matches(&labels(&[("team", "infra"), ("owner", "x")])));
        assert!(!s.matches(&labels(&[("team", "web"), ("owner", "x")])));
        assert!(!s.matches(&labels(&[("owner", "x")])), "in needs the key");
        assert!(!s.matches(&labels(&[
            ("team", "core"),
            ("owner", "x"),
            ("tier", "gpu")
        ])));
        assert!(
            Selector::parse("tier notin (gpu)")
                .unwrap()
                .matches(&labels(&[])),
            "notin holds without the key"
        );
    }

    #[test]
    fn a_selector_no_label_could_match_is_an_error_naming_the_part() {
        let e = Selector::parse("team=Core!").unwrap_err();
        assert!(
            e.to_string().contains("\"team=Core!\": invalid value"),
            "{e}"
        );
        let e = Selector::parse("team in (core").unwrap_err();
        assert!(e.to_string().contains("unclosed '('"), "{e}");
        let e = Selector::parse("team within (core)").unwrap_err();
        assert!(e.to_string().contains("expected KEY in (VALUES)"), "{e}");
        assert!(Selector::parse("team in (a,b) x").is_err());
        for empty in ["team in ()", "team notin ()", "team in (core,)"] {
            let e = Selector::parse(empty).unwrap_err();
            assert!(e.to_string().contains("a set needs values"), "{empty}: {e}");
        }
    }
}
