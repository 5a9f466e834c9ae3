//! Label selectors: `matchLabels` and `matchExpressions`, ANDed. An empty selector selects
//! everything.

use std::collections::BTreeSet;

use super::model::Labels;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: BTreeSet<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    /// `NotIn` and `DoesNotExist` match objects that lack the key, as Kubernetes does.
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: Operator, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: Labels::new(),
            match_expressions: vec![Requirement {
                key: key.into(),
                operator,
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
        }
    }

    #[test]
    fn table() {
        let with = labels(&[("app", "web"), ("tier", "front")]);
        let without = labels(&[("tier", "front")]);
        let cases = [
            (LabelSelector::everything(), &with, true),
            (LabelSelector::everything(), &without, true),
            (
                LabelSelector {
                    match_labels: labels(&[("app", "web")]),
                    ..Default::default()
                },
                &with,
                true,
            ),
            (
                LabelSelector {
                    match_labels: labels(&[("app", "web")]),
                    ..Default::default()
                },
                &without,
                false,
            ),
            (req("app", Operator::In, &["web", "api"]), &with, true),
            (req("app", Operator::In, &["api"]), &with, false),
            (req("app", Operator::In, &["web"]), &without, false),
            (req("app", Operator::NotIn, &["web"]), &with, false),
            (req("app", Operator::NotIn, &["api"]), &with, true),
            (req("app", Operator::NotIn, &["web"]), &without, true),
            (req("app", Operator::Exists, &[]), &with, true),
            (req("app", Operator::Exists, &[]), &without, false),
            (req("app", Operator::DoesNotExist, &[]), &with, false),
            (req("app", Operator::DoesNotExist, &[]), &without, true),
        ];
        for (i, (selector, labels, want)) in cases.iter().enumerate() {
            assert_eq!(
                selector.matches(labels),
                *want,
                "case {i}: {selector:?} on {labels:?}"
            );
        }
    }
}
