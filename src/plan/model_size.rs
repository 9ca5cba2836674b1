//! A model's size class ([`ModelTier`]) from whatever is known of it: its parameter count
//! (which [`parameters_from_config`] estimates from a model's `config.json`), else the size in
//! its name (`Llama-3.2-3B-Instruct-4bit`), else its size on disk. Pure; the caller reads the
//! model's config and directory.

use serde_json::Value;

use super::ModelTier;

/// Bits per weight assumed for a model on disk whose name gives no precision: fp16 / bf16,
/// the precision models are published in.
pub const DEFAULT_WEIGHT_BITS: u32 = 16;

/// What is known of a model, for [`model_tier`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelFacts<'a> {
    /// Parameter count, when the model's config states it.
    pub parameter_count: Option<u64>,
    /// Model id or directory name.
    pub name: &'a str,
    /// Bytes of weights on disk, when known.
    pub disk_bytes: Option<u64>,
}

/// The tier of a model: from its parameter count, else from the size in its name
/// ([`parameters_from_name`]), else from its size on disk ([`parameters_from_disk_size`], at
/// the precision its name gives or [`DEFAULT_WEIGHT_BITS`]). `None` when nothing tells.
pub fn model_tier(model: &ModelFacts<'_>) -> Option<ModelTier> {
    let parameters = model
        .parameter_count
        .or_else(|| parameters_from_name(model.name))
        .or_else(|| {
            let bits = weight_bits_from_name(model.name).unwrap_or(DEFAULT_WEIGHT_BITS);
            model
                .disk_bytes
                .map(|bytes| parameters_from_disk_size(bytes, bits))
        })?;
    Some(ModelTier::from_parameter_count(parameters))
}

/// The tier a model is planned in: [`model_tier`], or `7-13B` when nothing tells its size (a
/// model of unknown size is planned as a mid-sized one).
pub fn planned_tier(model: &ModelFacts<'_>) -> ModelTier {
    model_tier(model).unwrap_or(ModelTier::Medium)
}

/// The parameter count a model's name states: the largest word (split at anything but
/// letters, digits and `.`, case-insensitive) of the form `7b`, `0.5b`, `135m` or, for a
/// mixture of experts, `8x7b` (experts × size: an overestimate, since experts share the
/// attention weights, which errs toward the larger tier). `A3B`-style active-parameter words
/// and `4bit` are not sizes.
pub fn parameters_from_name(name: &str) -> Option<u64> {
    words(name).filter_map(|word| size_word(&word)).max()
}

/// The parameters of one word such as `7b`, `1.5b`, `135m` or `8x7b`.
fn size_word(word: &str) -> Option<u64> {
    let (number, unit) = if let Some(number) = word.strip_suffix('b') {
        (number, 1e9)
    } else {
        (word.strip_suffix('m')?, 1e6)
    };
    let (experts, size) = match number.split_once('x') {
        Some((experts, size)) => (decimal(experts)?, decimal(size)?),
        None => (1.0, decimal(number)?),
    };
    let parameters = experts * size * unit;
    // Float-to-integer `as` saturates, so an absurd size reads as the largest count.
    (parameters >= 1.0).then_some(parameters as u64)
}

/// A plain decimal such as `7` or `0.5`: digits, at most one `.`, digits at both ends.
fn decimal(text: &str) -> Option<f64> {
    let well_formed = text.starts_with(|c: char| c.is_ascii_digit())
        && text.ends_with(|c: char| c.is_ascii_digit())
        && text.chars().all(|c| c.is_ascii_digit() || c == '.')
        && text.matches('.').count() <= 1;
    well_formed.then(|| text.parse().ok()).flatten()
}

/// The bits per weight a model's name states: the first word such as `4bit`, `int8`, `q4`
/// (also `q4_k_m`), `fp16`, `bf16` or `mxfp4`, from 1 to 32 bits.
pub fn weight_bits_from_name(name: &str) -> Option<u32> {
    words(name).find_map(|word| {
        let word = word.as_str();
        let digits = word.strip_suffix("bit").or_else(|| {
            ["mxfp", "int", "bf", "fp", "q"]
                .into_iter()
                .find_map(|prefix| word.strip_prefix(prefix))
        })?;
        let all_digits = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
        let bits: u32 = all_digits.then(|| digits.parse().ok()).flatten()?;
        (1..=32).contains(&bits).then_some(bits)
    })
}

/// The lower-case words of a name, split at anything but ASCII letters, digits and `.`.
fn words(name: &str) -> impl Iterator<Item = String> + '_ {
    name.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
        .filter(|word| !word.is_empty())
        .map(str::to_ascii_lowercase)
}

/// A rough parameter count from the bytes of weights on disk at `weight_bits` per weight.
///
/// Quantized weights also store a scale and a bias per group (about half a bit per weight at
/// MLX's group size of 64) and the directory holds a tokenizer, so the estimate is a little
/// high: it errs toward the larger tier, which is the safe side for memory.
///
/// # Panics
///
/// When `weight_bits` is 0 (a caller's bug: [`weight_bits_from_name`] never returns it).
pub fn parameters_from_disk_size(disk_bytes: u64, weight_bits: u32) -> u64 {
    assert!(weight_bits > 0, "weight_bits is at least 1");
    let parameters = u128::from(disk_bytes) * 8 / u128::from(weight_bits);
    u64::try_from(parameters).unwrap_or(u64::MAX)
}

/// Parameters from a Llama-style configuration (a model's `config.json`): embeddings,
/// attention, MLP and norms; `None` when its dimensions are not given.
pub fn parameters_from_config(config: &Value) -> Option<u64> {
    let field = |name: &str| config.get(name).and_then(Value::as_u64);
    let hidden = field("hidden_size")?;
    let layers = field("num_hidden_layers")?;
    let vocab = field("vocab_size")?;
    let intermediate = field("intermediate_size").unwrap_or(4 * hidden);
    let heads = field("num_attention_heads").unwrap_or(1).max(1);
    let kv_heads = field("num_key_value_heads").unwrap_or(heads);
    let head_dim = field("head_dim").unwrap_or(hidden / heads);
    let tied = config
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2;
    let mlp = 3 * hidden * intermediate;
    let norms = 2 * hidden;
    let embeddings = vocab * hidden * if tied { 1 } else { 2 };
    layers
        .checked_mul(attention + mlp + norms)?
        .checked_add(embeddings + hidden)
}

#[cfg(test)]
mod tests;
