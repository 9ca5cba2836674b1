// Goal: every Apple Silicon brand string maps to the right generation, variant, wire name and
// GPU-core estimate, and anything else is refused with a clear error.
// Method: one `check` helper over brand strings as `sysctl -n machdep.cpu.brand_string`
// prints them, including the captured fixtures.

use super::*;
use crate::hardware::tests::fixture;

#[track_caller]
fn check(brand: &str, model_name: &str, generation: u32, variant: ChipVariant, gpu_cores: u32) {
    let chip = parse_brand_string(brand).unwrap();
    assert_eq!(
        chip,
        AppleChip {
            generation,
            variant
        },
        "{brand}"
    );
    assert_eq!(chip.model_name(), model_name, "{brand}");
    assert_eq!(chip.estimated_gpu_cores(), Some(gpu_cores), "{brand}");
}

#[test]
fn parses_the_captured_brand_strings() {
    let cases = [
        ("m1", "M1", 1, ChipVariant::Base, 8),
        ("m1-pro", "M1-Pro", 1, ChipVariant::Pro, 16),
        ("m2-max", "M2-Max", 2, ChipVariant::Max, 38),
        ("m3-ultra", "M3-Ultra", 3, ChipVariant::Ultra, 80),
        ("m4-pro", "M4-Pro", 4, ChipVariant::Pro, 20),
        ("m4-max", "M4-Max", 4, ChipVariant::Max, 40),
    ];
    for (dir, name, generation, variant, gpu_cores) in cases {
        let brand = fixture(&format!("mac/{dir}/brand_string.txt"));
        check(&brand, name, generation, variant, gpu_cores);
    }
}

#[test]
fn estimates_gpu_cores_from_the_whole_table() {
    let table = [
        (1, [8, 16, 32, 64]),
        (2, [10, 19, 38, 76]),
        (3, [10, 18, 40, 80]),
        (4, [10, 20, 40, 80]),
        (5, [12, 20, 40, 80]),
    ];
    let variants = [
        ChipVariant::Base,
        ChipVariant::Pro,
        ChipVariant::Max,
        ChipVariant::Ultra,
    ];
    for (generation, cores) in table {
        for (variant, expected) in variants.into_iter().zip(cores) {
            let chip = AppleChip {
                generation,
                variant,
            };
            assert_eq!(chip.estimated_gpu_cores(), Some(expected), "{chip:?}");
        }
    }
}

#[test]
fn has_no_estimate_for_an_unknown_generation() {
    let chip = parse_brand_string("Apple M6 Pro").unwrap();
    assert_eq!(chip.model_name(), "M6-Pro");
    assert_eq!(chip.estimated_gpu_cores(), None);
}

#[test]
fn ignores_case_and_surrounding_whitespace() {
    check("  apple m5 MAX \n", "M5-Max", 5, ChipVariant::Max, 40);
}

#[test]
fn reads_the_strongest_variant_named() {
    check("Apple M2 Pro Max", "M2-Max", 2, ChipVariant::Max, 38);
}

#[test]
fn recognises_an_ultra_of_every_generation() {
    check("Apple M4 Ultra", "M4-Ultra", 4, ChipVariant::Ultra, 80);
}

#[test]
fn refuses_an_intel_brand_string() {
    let intel = fixture("mac/intel-i9/brand_string.txt");
    assert_eq!(
        parse_brand_string(&intel),
        Err(ParseError::UnknownChip {
            brand: "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz".to_owned()
        })
    );
}

#[test]
fn does_not_read_intel_core_m3_as_apple_m3() {
    let result = parse_brand_string("Intel(R) Core(TM) m3-7Y30 CPU @ 1.00GHz");
    assert!(
        matches!(result, Err(ParseError::UnknownChip { .. })),
        "{result:?}"
    );
}

#[test]
fn refuses_generation_zero() {
    let result = parse_brand_string("Apple M0");
    assert!(
        matches!(result, Err(ParseError::UnknownChip { .. })),
        "{result:?}"
    );
}

#[test]
fn refuses_an_empty_brand_string() {
    let empty = fixture("malformed/brand_string_empty.txt");
    assert_eq!(
        parse_brand_string(&empty),
        Err(ParseError::Empty {
            what: "cpu brand string"
        })
    );
}
