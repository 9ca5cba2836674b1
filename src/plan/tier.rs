//! Model size tiers: the unit in which concurrency is planned.
//!
//! A model's tier comes from its parameter count. The tier names are the existing
//! mlx-serving strings (`30B+`, `13-27B`, …) because they appear on the wire in the
//! registration's `capabilities.supportedModelTiers` and as keys in the configuration.

use std::fmt;
use std::str::FromStr;

/// A model size class, largest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelTier {
    /// 30 billion parameters and more.
    Huge,
    /// 13 to 27 billion parameters (up to 30 B).
    Large,
    /// 7 to 13 billion parameters.
    Medium,
    /// 3 to 7 billion parameters.
    Small,
    /// Fewer than 3 billion parameters.
    Tiny,
}

impl ModelTier {
    /// Every tier, largest first: the order the wire and the tables use.
    pub const ALL: [ModelTier; 5] = [
        ModelTier::Huge,
        ModelTier::Large,
        ModelTier::Medium,
        ModelTier::Small,
        ModelTier::Tiny,
    ];

    /// The tier of a model with `parameters` parameters.
    pub fn from_parameter_count(parameters: u64) -> ModelTier {
        const BILLION: u64 = 1_000_000_000;
        match parameters {
            p if p >= 30 * BILLION => ModelTier::Huge,
            p if p >= 13 * BILLION => ModelTier::Large,
            p if p >= 7 * BILLION => ModelTier::Medium,
            p if p >= 3 * BILLION => ModelTier::Small,
            _ => ModelTier::Tiny,
        }
    }

    /// The wire and configuration name of the tier.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelTier::Huge => "30B+",
            ModelTier::Large => "13-27B",
            ModelTier::Medium => "7-13B",
            ModelTier::Small => "3-7B",
            ModelTier::Tiny => "<3B",
        }
    }
}

impl fmt::Display for ModelTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a string that names no tier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown model tier {given:?}, expected one of 30B+, 13-27B, 7-13B, 3-7B, <3B")]
pub struct UnknownTier {
    /// The string that was given.
    pub given: String,
}

impl FromStr for ModelTier {
    type Err = UnknownTier;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelTier::ALL
            .into_iter()
            .find(|tier| tier.as_str() == s)
            .ok_or_else(|| UnknownTier {
                given: s.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_names_round_trip() {
        for tier in ModelTier::ALL {
            assert_eq!(tier.as_str().parse::<ModelTier>(), Ok(tier));
        }
        assert!("7B".parse::<ModelTier>().is_err());
    }

    #[test]
    fn tier_boundaries_follow_parameter_counts() {
        let check = |params: u64, tier: ModelTier| {
            assert_eq!(ModelTier::from_parameter_count(params), tier, "{params}")
        };
        check(0, ModelTier::Tiny);
        check(2_999_999_999, ModelTier::Tiny);
        check(3_000_000_000, ModelTier::Small);
        check(7_000_000_000, ModelTier::Medium);
        check(13_000_000_000, ModelTier::Large);
        check(29_999_999_999, ModelTier::Large);
        check(30_000_000_000, ModelTier::Huge);
    }
}
