//! Apple Silicon chip identity read from the CPU brand string (`Apple M2 Max`): generation,
//! variant, the chip name used on the wire (`M2-Max`) and the GPU-core estimate used when
//! `system_profiler` cannot tell. Pure; running `sysctl` is [`super::mac`]'s job.

use super::{ChipVariant, ParseError};

/// An Apple Silicon chip as its brand string names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppleChip {
    /// 1 for M1, 2 for M2 …
    pub generation: u32,
    /// Base, Pro, Max or Ultra.
    pub variant: ChipVariant,
}

impl AppleChip {
    /// The wire's chip name: `M1`, `M1-Pro`, `M2-Max`, `M3-Ultra` …
    pub fn model_name(self) -> String {
        match self.variant {
            ChipVariant::Base => format!("M{}", self.generation),
            variant => format!("M{}-{}", self.generation, variant.as_str()),
        }
    }

    /// The usual GPU-core count of this chip (the existing detector's table; the binned
    /// variants with fewer cores cannot be told apart by name), or `None` for a generation
    /// the table does not know.
    ///
    /// The table has no Ultra for M4 and M5 (no such chip existed); it is taken as twice the
    /// Max, as for the earlier generations.
    pub fn estimated_gpu_cores(self) -> Option<u32> {
        let [base, pro, max] = match self.generation {
            1 => [8, 16, 32],
            2 => [10, 19, 38],
            3 => [10, 18, 40],
            4 => [10, 20, 40],
            5 => [12, 20, 40],
            _ => return None,
        };
        Some(match self.variant {
            ChipVariant::Base => base,
            ChipVariant::Pro => pro,
            ChipVariant::Max => max,
            ChipVariant::Ultra => 2 * max,
        })
    }
}

/// Reads the output of `sysctl -n machdep.cpu.brand_string` (`Apple M2 Max`).
///
/// The chip is the first whitespace-separated word `m<generation>` (case-insensitive, any
/// generation from 1); the variant is the strongest of `ultra`, `max`, `pro` among the words
/// after it, else Base. Matching whole words rather than substrings keeps Intel's
/// `Core(TM) m3-7Y30` from reading as an M3; unlike the TypeScript detector, Ultra is
/// recognised for every generation.
///
/// # Errors
///
/// [`ParseError::Empty`] for blank output, [`ParseError::UnknownChip`] when no word names an
/// Apple Silicon chip (an Intel Mac, a Linux host).
pub fn parse_brand_string(output: &str) -> Result<AppleChip, ParseError> {
    let brand = output.trim();
    if brand.is_empty() {
        return Err(ParseError::Empty {
            what: "cpu brand string",
        });
    }
    let lower = brand.to_lowercase();
    let mut words = lower.split_whitespace();
    let generation =
        words
            .by_ref()
            .find_map(chip_generation)
            .ok_or_else(|| ParseError::UnknownChip {
                brand: brand.chars().take(ParseError::VALUE_CHARS_MAX).collect(),
            })?;
    let variant = words
        .filter_map(variant_word)
        .max_by_key(|variant| variant_rank(*variant))
        .unwrap_or(ChipVariant::Base);
    Ok(AppleChip {
        generation,
        variant,
    })
}

/// The generation of a word `m<digits>` (`m2` → 2), if it is one and at least 1.
fn chip_generation(word: &str) -> Option<u32> {
    let digits = word.strip_prefix('m')?;
    if !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|generation| *generation >= 1)
}

/// The variant a lower-case word names, if any.
fn variant_word(word: &str) -> Option<ChipVariant> {
    match word {
        "pro" => Some(ChipVariant::Pro),
        "max" => Some(ChipVariant::Max),
        "ultra" => Some(ChipVariant::Ultra),
        _ => None,
    }
}

/// Variant strength: a brand naming two variants is read as the stronger, as the TypeScript
/// detector's `ultra`, `max`, `pro` check order does.
fn variant_rank(variant: ChipVariant) -> u8 {
    match variant {
        ChipVariant::Base => 0,
        ChipVariant::Pro => 1,
        ChipVariant::Max => 2,
        ChipVariant::Ultra => 3,
    }
}

#[cfg(test)]
mod tests;
