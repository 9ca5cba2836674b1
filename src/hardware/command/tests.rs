// Goal: a tool run is bounded in time and output, and a missing program is remembered.
// Method: run real POSIX programs (`sh`, `printf`) and one that cannot exist; these tests need a
// Unix host, which every target of the worker is.

use std::time::Duration;

use super::*;

const NO_SUCH_PROGRAM: &str = "mlx-worker-no-such-tool";

#[tokio::test]
async fn run_returns_standard_output() {
    let output = run("printf", &["a\\nb"], PROFILE_COMMAND_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(output, "a\nb");
}

#[tokio::test]
async fn run_reports_a_missing_program_as_absent() {
    let result = run(NO_SUCH_PROGRAM, &[], PROFILE_COMMAND_TIMEOUT).await;
    assert!(
        matches!(result, Err(ProbeError::Absent { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn run_kills_a_command_that_outlives_its_timeout() {
    let result = run("sh", &["-c", "sleep 5"], Duration::from_millis(50)).await;
    let err = result.unwrap_err();
    assert!(matches!(err, ProbeError::TimedOut { .. }), "{err:?}");
    assert_eq!(err.to_string(), "sh did not finish within 50ms");
}

#[tokio::test]
async fn run_rejects_output_over_the_limit() {
    let script = format!("head -c {} /dev/zero", COMMAND_OUTPUT_BYTES_MAX + 10);
    let result = run("sh", &["-c", &script], PROFILE_COMMAND_TIMEOUT).await;
    assert!(
        matches!(result, Err(ProbeError::OutputTooLarge { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn run_treats_a_non_zero_exit_as_failure() {
    let result = run(
        "sh",
        &["-c", "echo partial; exit 3"],
        PROFILE_COMMAND_TIMEOUT,
    )
    .await;
    assert!(
        matches!(result, Err(ProbeError::Failed { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn tool_remembers_that_its_program_is_missing() {
    let tool = Tool::new(NO_SUCH_PROGRAM, &[]);
    assert!(!tool.absent.load(Ordering::Relaxed));
    let first = tool.run(SAMPLE_COMMAND_TIMEOUT).await;
    assert!(matches!(first, Err(ProbeError::Absent { .. })), "{first:?}");
    assert!(tool.absent.load(Ordering::Relaxed));
}

#[tokio::test]
async fn tool_keeps_running_a_program_that_exists() {
    let tool = Tool::new("printf", &["ok"]);
    for _ in 0..2 {
        assert_eq!(tool.run(SAMPLE_COMMAND_TIMEOUT).await.unwrap(), "ok");
    }
    assert!(!tool.absent.load(Ordering::Relaxed));
}
