//! The agent's argv template: `{{task.name}}`, `{{task.id}}`, `{{task.params.KEY}}`,
//! `{{agent.name}}`, `{{lease.name}}`, `{{attempt}}` (any key present in the variables, spaces
//! inside the braces allowed) are substituted per argument. No shell is involved: a value
//! containing spaces or quotes stays one argument.

use std::collections::BTreeMap;
use std::fmt;

/// A template that cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// `{{name}}` names no known variable.
    UnknownVariable { variable: String, index: usize },
    /// A `{{` without its `}}`.
    Unterminated { index: usize },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::UnknownVariable { variable, index } => write!(
                f,
                "unknown variable {{{{{variable}}}}} in command argument {index}"
            ),
            TemplateError::Unterminated { index } => {
                write!(f, "unterminated {{{{ in command argument {index}")
            }
        }
    }
}

impl std::error::Error for TemplateError {}

/// Renders every argument of `template` with `vars`. Argument indexes in errors are 0-based.
pub fn render(
    template: &[String],
    vars: &BTreeMap<String, String>,
) -> Result<Vec<String>, TemplateError> {
    template
        .iter()
        .enumerate()
        .map(|(index, arg)| render_one(arg, index, vars))
        .collect()
}

fn render_one(
    arg: &str,
    index: usize,
    vars: &BTreeMap<String, String>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or(TemplateError::Unterminated { index })?;
        let key = after[..end].trim();
        let value = vars
            .get(key)
            .ok_or_else(|| TemplateError::UnknownVariable {
                variable: key.to_string(),
                index,
            })?;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        [
            ("task.name", "fix-login"),
            ("task.id", "42"),
            ("task.params.branch", "feature/x y"),
            ("agent.name", "vaela"),
            ("lease.name", "fix-login"),
            ("attempt", "2"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn variables_are_substituted_per_argument_with_optional_spaces() {
        let out = render(
            &s(&[
                "goose",
                "--recipe=recipes/{{agent.name}}.yaml",
                "{{ task.params.branch }}",
                "{{task.name}}#{{attempt}}@{{lease.name}}:{{ task.id}}",
                "plain",
            ]),
            &vars(),
        )
        .unwrap();
        assert_eq!(
            out,
            s(&[
                "goose",
                "--recipe=recipes/vaela.yaml",
                "feature/x y",
                "fix-login#2@fix-login:42",
                "plain"
            ])
        );
    }

    #[test]
    fn a_value_with_braces_is_not_expanded_again() {
        let mut v = vars();
        v.insert("task.params.p".into(), "{{task.name}}".into());
        assert_eq!(
            render(&s(&["{{task.params.p}}"]), &v).unwrap(),
            s(&["{{task.name}}"])
        );
    }

    #[test]
    fn an_unknown_variable_is_an_error_naming_it_and_the_argument_index() {
        let e = render(&s(&["a", "b", "x{{task.params.nope}}"]), &vars()).unwrap_err();
        assert_eq!(
            e,
            TemplateError::UnknownVariable {
                variable: "task.params.nope".into(),
                index: 2
            }
        );
        assert_eq!(
            e.to_string(),
            "unknown variable {{task.params.nope}} in command argument 2"
        );
    }

    #[test]
    fn an_unterminated_placeholder_is_an_error() {
        let e = render(&s(&["{{task.name"]), &vars()).unwrap_err();
        assert_eq!(e, TemplateError::Unterminated { index: 0 });
    }
}
