// Goal: the per-tier limits reproduce every cell of the existing detector's table (with
// JavaScript's half-up rounding), confidence and supported tiers follow the documented
// thresholds, configuration overrides replace exactly the tiers they name, and the batch size
// asked for a model is its tier's figure, the configured one, or 1 without batching.
// Method: table-driven checks over hand-built profiles of real chips and Linux hosts.

use std::collections::BTreeMap;

use super::*;

const GIB: u64 = 1 << 30;

fn profile(variant: ChipVariant, generation: u32, gpu_cores: u32, memory_gb: u64) -> HostProfile {
    HostProfile {
        chip_model: "test".to_owned(),
        chip_generation: generation,
        variant,
        cpu_brand: "test".to_owned(),
        cpu_cores: 8,
        performance_cores: 4,
        efficiency_cores: 4,
        gpu_cores,
        gpus: Vec::new(),
        memory_bytes: memory_gb * GIB,
        metal_version: None,
        os_version: "test".to_owned(),
    }
}

fn linux(memory_bytes: u64) -> HostProfile {
    HostProfile {
        memory_bytes,
        ..profile(ChipVariant::Base, 0, 0, 0)
    }
}

fn limit(max_concurrent: usize, queue_depth: usize) -> TierLimit {
    TierLimit {
        max_concurrent,
        queue_depth,
    }
}

#[test]
fn reproduces_every_cell_of_the_concurrency_table() {
    let variants = [
        ChipVariant::Base,
        ChipVariant::Pro,
        ChipVariant::Max,
        ChipVariant::Ultra,
    ];
    let table = [
        (ModelTier::Huge, [(1, 10), (2, 15), (3, 25), (4, 40)]),
        (ModelTier::Large, [(3, 20), (5, 30), (8, 50), (12, 60)]),
        (ModelTier::Medium, [(6, 30), (9, 45), (15, 75), (24, 80)]),
        (ModelTier::Small, [(8, 40), (12, 60), (20, 100), (32, 100)]),
        (ModelTier::Tiny, [(10, 50), (15, 75), (25, 120), (40, 120)]),
    ];
    for (tier, row) in table {
        for (variant, (max_concurrent, queue_depth)) in variants.into_iter().zip(row) {
            assert_eq!(
                default_tier_limit(tier, variant),
                limit(max_concurrent, queue_depth),
                "{tier} on {variant:?}"
            );
        }
    }
}

#[test]
fn recommends_the_table_for_the_profiles_variant() {
    let recommendation = Recommendation::for_profile(&profile(ChipVariant::Pro, 1, 16, 32));
    for tier in ModelTier::ALL {
        assert_eq!(
            recommendation.limit(tier),
            default_tier_limit(tier, ChipVariant::Pro)
        );
        assert_eq!(recommendation.source(tier), LimitSource::Detected);
    }
}

#[test]
fn rates_confidence_from_gpu_generation_and_memory() {
    let cases = [
        // 8 × 1.2 × 1 × 16/16 = 9.6
        (profile(ChipVariant::Base, 1, 8, 16), Confidence::Low),
        // 10 × 1.2 × 3 × 24/16 = 54
        (profile(ChipVariant::Base, 3, 10, 24), Confidence::Medium),
        // 38 × 1.2 × 2 × 64/16 = 364.8
        (profile(ChipVariant::Max, 2, 38, 64), Confidence::High),
        // 19 × 1.2 × 2 × 16/16 = 45.6
        (profile(ChipVariant::Pro, 2, 19, 16), Confidence::Low),
        (linux(512 * GIB), Confidence::Low),
    ];
    for (profile, expected) in cases {
        assert_eq!(Confidence::of(&profile), expected, "{profile:?}");
    }
}

#[test]
fn supports_tiers_by_gpu_cores_and_memory() {
    use ModelTier::*;
    let cases = [
        (profile(ChipVariant::Base, 1, 8, 16), vec![Tiny]),
        (profile(ChipVariant::Base, 2, 10, 8), vec![Small, Tiny]),
        (
            profile(ChipVariant::Pro, 1, 16, 32),
            vec![Medium, Small, Tiny],
        ),
        (
            profile(ChipVariant::Pro, 4, 20, 48),
            vec![Large, Medium, Small, Tiny],
        ),
        (
            profile(ChipVariant::Max, 2, 38, 32),
            vec![Large, Medium, Small, Tiny],
        ),
        (
            profile(ChipVariant::Max, 2, 38, 64),
            vec![Huge, Large, Medium, Small, Tiny],
        ),
        (
            profile(ChipVariant::Max, 1, 32, 64),
            vec![Huge, Large, Medium, Small, Tiny],
        ),
    ];
    for (profile, expected) in cases {
        let supported: Vec<_> = ModelTier::ALL
            .into_iter()
            .filter(|tier| supports(&profile, *tier))
            .collect();
        assert_eq!(supported, expected, "{profile:?}");
    }
}

#[test]
fn judges_linux_hosts_on_rounded_memory_alone() {
    use ModelTier::*;
    let cases = [
        (4 * GIB, vec![Tiny]),
        // 15.3 GiB rounds to 15: short of the 16 GiB for 7-13B.
        (16_069_160 * 1024, vec![Small, Tiny]),
        (62 * GIB, vec![Large, Medium, Small, Tiny]),
        // 63.5 GiB rounds half up to 64.
        (63 * GIB + GIB / 2, vec![Huge, Large, Medium, Small, Tiny]),
    ];
    for (memory_bytes, expected) in cases {
        let host = linux(memory_bytes);
        let capabilities = Capabilities::of(&host, &Recommendation::for_profile(&host));
        assert_eq!(capabilities.supported_tiers, expected, "{memory_bytes}");
    }
}

#[test]
fn capabilities_use_the_largest_supported_tier_and_80_percent_of_memory() {
    let m2_max = profile(ChipVariant::Max, 2, 38, 64);
    let capabilities = Capabilities::of(&m2_max, &Recommendation::for_profile(&m2_max));
    assert_eq!(capabilities.max_concurrent, 3);
    assert!((capabilities.available_memory_gb - 51.2).abs() < 1e-9);

    let m1 = profile(ChipVariant::Base, 1, 8, 16);
    let capabilities = Capabilities::of(&m1, &Recommendation::for_profile(&m1));
    assert_eq!(capabilities.supported_tiers, [ModelTier::Tiny]);
    assert_eq!(capabilities.max_concurrent, 10);
    assert!((capabilities.available_memory_gb - 12.8).abs() < 1e-9);
}

#[test]
fn overrides_replace_only_the_tiers_they_name() {
    let m2_max = profile(ChipVariant::Max, 2, 38, 64);
    let overrides = BTreeMap::from([
        (ModelTier::Huge, limit(2, 7)),
        (ModelTier::Tiny, limit(9, 9)),
    ]);
    let recommendation = Recommendation::for_profile(&m2_max).with_overrides(&overrides);
    for tier in ModelTier::ALL {
        let (expected, source) = match overrides.get(&tier) {
            Some(limit) => (*limit, LimitSource::Configured),
            None => (
                default_tier_limit(tier, ChipVariant::Max),
                LimitSource::Detected,
            ),
        };
        assert_eq!(recommendation.limit(tier), expected, "{tier}");
        assert_eq!(recommendation.source(tier), source, "{tier}");
    }
    assert_eq!(recommendation.tier_limits()[&ModelTier::Huge], limit(2, 7));
    assert_eq!(Capabilities::of(&m2_max, &recommendation).max_concurrent, 2);
}

#[test]
fn no_overrides_change_nothing() {
    let m4_pro = profile(ChipVariant::Pro, 4, 20, 48);
    let detected = Recommendation::for_profile(&m4_pro);
    assert_eq!(detected.clone().with_overrides(&BTreeMap::new()), detected);
}

#[test]
fn a_models_batch_size_is_its_tiers_figure_the_configured_one_or_one_without_batching() {
    let max = Recommendation::for_profile(&profile(ChipVariant::Max, 2, 38, 96));
    let overridden = max
        .clone()
        .with_overrides(&BTreeMap::from([(ModelTier::Tiny, limit(4, 10))]));
    let check = |sizes: BatchSizes, expected: [usize; 5]| {
        let got = ModelTier::ALL.map(|tier| sizes.for_tier(tier));
        assert_eq!(got, expected, "{sizes:?}");
    };
    // The Max column of the table, largest tier first.
    check(BatchSizes::configured(true, None, &max), [3, 8, 15, 20, 25]);
    check(
        BatchSizes::configured(true, None, &overridden),
        [3, 8, 15, 20, 4],
    );
    check(BatchSizes::configured(true, Some(32), &max), [32; 5]);
    check(BatchSizes::configured(false, Some(32), &max), [1; 5]);
    check(BatchSizes::configured(false, None, &max), [1; 5]);
    check(BatchSizes::uniform(0), [1; 5]);
    // Without a plan, the runtime's own default.
    check(BatchSizes::default(), [8; 5]);
}
