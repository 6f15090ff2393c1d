//! Sales pipeline definitions: the ordered stages of a pipeline and the win
//! probability of each stage.

use serde::{Deserialize, Serialize};
use std::sync::LazyLock;

/// Stage key every pipeline closes won into (reached only by winning).
pub const CLOSED_WON: &str = "closed_won";
/// Stage key every pipeline closes lost into (reached only by losing).
pub const CLOSED_LOST: &str = "closed_lost";
/// Name of the built-in pipeline.
pub const DEFAULT_PIPELINE: &str = "default";

/// One stage of a pipeline with its win probability in percent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StageDefinition {
    pub key: String,
    pub probability: u8,
}

/// A named pipeline: open stages in order, then `closed_won` / `closed_lost`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PipelineDefinition {
    pub name: String,
    pub stages: Vec<StageDefinition>,
}

static DEFAULT: LazyLock<PipelineDefinition> = LazyLock::new(PipelineDefinition::default_pipeline);

/// The pipeline called `name` (only `"default"` for now).
pub fn find(name: &str) -> Option<&'static PipelineDefinition> {
    (name == DEFAULT_PIPELINE).then(|| &*DEFAULT)
}

impl PipelineDefinition {
    /// prospecting 10 -> qualification 25 -> proposal 50 -> negotiation 75,
    /// plus closed_won 100 / closed_lost 0.
    pub fn default_pipeline() -> Self {
        let stage = |key: &str, probability| StageDefinition {
            key: key.to_string(),
            probability,
        };
        Self {
            name: DEFAULT_PIPELINE.to_string(),
            stages: vec![
                stage("prospecting", 10),
                stage("qualification", 25),
                stage("proposal", 50),
                stage("negotiation", 75),
                stage(CLOSED_WON, 100),
                stage(CLOSED_LOST, 0),
            ],
        }
    }

    /// Probability (percent) of `stage`, if it belongs to this pipeline.
    pub fn probability(&self, stage: &str) -> Option<u8> {
        self.stages
            .iter()
            .find(|s| s.key == stage)
            .map(|s| s.probability)
    }

    /// Whether `stage` is an open (not closed) stage of this pipeline.
    pub fn is_open_stage(&self, stage: &str) -> bool {
        stage != CLOSED_WON && stage != CLOSED_LOST && self.stages.iter().any(|s| s.key == stage)
    }

    /// The open stages in order.
    pub fn open_stages(&self) -> impl Iterator<Item = &StageDefinition> {
        self.stages.iter().filter(|s| self.is_open_stage(&s.key))
    }

    /// Key of the first open stage.
    pub fn first_stage(&self) -> &str {
        self.open_stages().next().map_or("", |s| s.key.as_str())
    }

    /// Position of `stage` in the pipeline.
    pub fn stage_index(&self, stage: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.key == stage)
    }

    /// Message listing the open stages, for validation errors.
    pub fn open_stage_message(&self) -> String {
        let keys: Vec<&str> = self.open_stages().map(|s| s.key.as_str()).collect();
        format!(
            "must be an open stage of pipeline '{}': {}",
            self.name,
            keys.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pipeline_shape() {
        let p = find("default").unwrap();
        assert!(find("enterprise").is_none());
        assert_eq!(p.first_stage(), "prospecting");
        assert_eq!(p.probability("proposal"), Some(50));
        assert_eq!(p.probability(CLOSED_WON), Some(100));
        assert_eq!(p.probability(CLOSED_LOST), Some(0));
        assert_eq!(p.probability("nope"), None);
        assert!(p.is_open_stage("negotiation"));
        assert!(!p.is_open_stage(CLOSED_WON));
        assert!(!p.is_open_stage("nope"));
        assert_eq!(p.open_stages().count(), 4);
        assert!(p
            .open_stage_message()
            .contains("prospecting, qualification"));
    }
}
