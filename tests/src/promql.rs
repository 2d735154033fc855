//! The metric names a PromQL expression reads, and the expressions of a
//! Grafana dashboard and of Prometheus alert rules: what
//! `tests/tests/metrics_deploy.rs` checks against `/metrics`.
//!
//! A metric name is an identifier not followed by `(` (that is a
//! function or aggregation) that is not a PromQL keyword. Skipped: label
//! matchers (`{...}`), ranges and subqueries (`[...]`), the label lists of
//! `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`,
//! strings, numbers and durations, comments, and Grafana variables
//! (`$instance`, `${instance}`).

use std::collections::BTreeSet;

use serde_json::Value;

const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
];

/// Keywords whose parenthesised list holds label names, not expressions.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Skips from `i` (an opening quote) past its closing quote.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    let quote = chars[i];
    i += 1;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Skips from `i` (an `open` bracket) past its matching `close`, over
/// strings and nested brackets.
fn skip_group(chars: &[char], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0usize;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(chars, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The metric names `expr` reads.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_group(&chars, i, '{', '}');
        } else if c == '[' {
            i = skip_group(&chars, i, '[', ']');
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '$' {
            // A Grafana variable: `$name` or `${name}`.
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_group(&chars, i, '{', '}');
            } else {
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // A number or a duration (`5m`, `1h30m`, `1e-3`, `0x1f`).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if ident_start(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            // `sum by (le) (...)`: an aggregation whose modifier comes first.
            let rest: String = chars[next..].iter().take(16).collect();
            let modified = ["by", "without"].iter().any(|m| {
                rest.strip_prefix(m)
                    .is_some_and(|r| r.trim_start().starts_with('('))
            });
            let called = chars.get(next) == Some(&'(') || modified;
            if LABEL_LISTS.contains(&word.as_str()) {
                if called {
                    i = skip_group(&chars, next, '(', ')');
                }
            } else if !called && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression of a Grafana dashboard: each panel target's
/// `expr` (rows and nested panels included), and the metric of each
/// `label_values(metric, label)` variable query.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

fn walk(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    ("query" | "definition", Value::String(q)) => {
                        if let Some(metric) = label_values_metric(q) {
                            out.push(metric.to_string());
                        }
                    }
                    _ => walk(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
        _ => {}
    }
}

/// `metric` of Grafana's `label_values(metric, label)`.
fn label_values_metric(query: &str) -> Option<&str> {
    let args = query.trim().strip_prefix("label_values(")?;
    let (metric, _label) = args.rsplit_once(',')?;
    Some(metric.trim())
}

/// Every `expr:` of a Prometheus rules file: a plain or quoted one-line
/// value, or a `|` / `>` block (its more-indented lines).
pub fn alert_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        i += 1;
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - trimmed.len();
            let mut block = Vec::new();
            while i < lines.len() {
                let l = lines[i];
                let body = l.trim_start();
                if !body.is_empty() && l.len() - body.len() <= indent {
                    break;
                }
                block.push(body);
                i += 1;
            }
            out.push(block.join("\n"));
        } else {
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            out.push(unquoted.to_string());
        }
    }
    out
}

/// The metric names of an exposition's samples (`name` of `name{...} v`).
pub fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Series Prometheus makes itself for every scrape target.
pub const SYNTHETIC: &[&str] = &["up", "scrape_duration_seconds", "scrape_samples_scraped"];

/// The names `exprs` read that `exposed` lacks (Prometheus' own aside).
pub fn missing<'a>(
    exprs: impl IntoIterator<Item = &'a String>,
    exposed: &BTreeSet<String>,
) -> BTreeSet<String> {
    exprs
        .into_iter()
        .flat_map(|e| metric_names(e))
        .filter(|n| !exposed.contains(n) && !SYNTHETIC.contains(&n.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(e: &str) -> Vec<String> {
        metric_names(e).into_iter().collect()
    }

    #[test]
    fn functions_aggregations_labels_and_ranges_are_not_metrics() {
        assert_eq!(
            names(
                r#"sum by (listener) (rate(chatmq_connections_accepted_total{instance=~"$instance", listener!="tcp"}[$__rate_interval]))"#
            ),
            ["chatmq_connections_accepted_total"]
        );
        assert_eq!(
            names("histogram_quantile(0.99, sum by (instance, le) (rate(chatmq_storage_commit_seconds_bucket[5m]))) > 0.25"),
            ["chatmq_storage_commit_seconds_bucket"]
        );
        assert_eq!(
            names("sum(rate(a_total[5m])) without(job) / on(instance) group_left(version) b_info offset 1h"),
            ["a_total", "b_info"]
        );
        assert_eq!(
            names(r#"up{job="chatmq"} == bool 0 and x or y unless z"#),
            ["up", "x", "y", "z"]
        );
        assert_eq!(
            names("max_over_time(q[1h:5m]) > 1e3 # comment metric_in_comment"),
            ["q"]
        );
        assert_eq!(names(r#"count(m{a="}{[("}) by (le)"#), ["m"]);
        assert_eq!(names("sum (rate (x [5m]))"), ["x"]);
        assert_eq!(names("rate(ns:job:rate5m[1m]) * Inf"), ["ns:job:rate5m"]);
    }

    #[test]
    fn dashboard_and_rules_expressions_are_found() {
        let dash: Value = serde_json::json!({
            "templating": {"list": [{"query": {"query": "label_values(m_var, instance)"}}]},
            "panels": [
                {"type": "row", "panels": [{"targets": [{"expr": "rate(m_row[5m])"}]}]},
                {"targets": [{"expr": "m_a"}, {"expr": "sum(m_b)"}]}
            ]
        });
        let mut got = dashboard_exprs(&dash);
        got.sort();
        assert_eq!(got, ["m_a", "m_var", "rate(m_row[5m])", "sum(m_b)"]);

        let yaml = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n        for: 1m\n      - alert: B\n        expr: |\n          sum(m_c)\n            > 1\n        for: 5m\n      - alert: C\n        expr: \"m_d > 2\"\n";
        assert_eq!(alert_exprs(yaml), ["up == 0", "sum(m_c)\n> 1", "m_d > 2"]);
    }

    #[test]
    fn a_misspelled_name_is_missing_and_prometheus_own_are_not() {
        let exposed = exposed_names("# TYPE chatmq_connections gauge\nchatmq_connections{listener=\"tcp\"} 1\nchatmq_x_total 2\n# EOF\n");
        assert_eq!(
            exposed.iter().collect::<Vec<_>>(),
            ["chatmq_connections", "chatmq_x_total"]
        );
        let exprs = vec![
            "sum(chatmq_conections)".to_string(),
            "up == 0".to_string(),
            "rate(chatmq_x_total[5m])".to_string(),
        ];
        assert_eq!(
            missing(&exprs, &exposed).into_iter().collect::<Vec<_>>(),
            ["chatmq_conections"]
        );
    }
}
