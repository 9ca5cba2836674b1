// Goal: the state-directory lock admits one holder at a time and names it to the others; the
// lock file's text and the other instance's ping answer are read as documented; the messages an
// operator reads name what to do.
// Method: real locks on a temporary directory (a second open of the lock file in this process
// is a second open file description, which flock refuses like another process); literal
// answers as a worker sends them.

use super::*;

#[test]
fn a_locked_state_directory_refuses_a_second_holder_until_the_first_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let first = StateLock::acquire(&state).unwrap();
    assert_eq!(first.path(), state.join(LOCK_FILE));
    let recorded = fs::read_to_string(first.path()).unwrap();
    assert_eq!(parse_holder(&recorded), Some(std::process::id()));

    let err = StateLock::acquire(&state).unwrap_err();
    assert!(err.is_conflict());
    match &err {
        InstanceError::Locked { state_dir, holder } => {
            assert_eq!(state_dir, &state);
            assert_eq!(*holder, Some(std::process::id()));
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    // The refused attempt left the holder's record alone.
    assert_eq!(fs::read_to_string(first.path()).unwrap(), recorded);

    drop(first);
    let again = StateLock::acquire(&state).unwrap();
    assert_eq!(
        parse_holder(&fs::read_to_string(again.path()).unwrap()),
        Some(std::process::id())
    );
}

#[test]
fn a_stale_lock_file_from_a_dead_holder_does_not_stop_a_start() {
    let dir = tempfile::tempdir().unwrap();
    // A longer record than ours, as a process killed long ago may have left: overwritten whole.
    fs::write(dir.path().join(LOCK_FILE), "4000000000\n\n\n").unwrap();
    let lock = StateLock::acquire(dir.path()).unwrap();
    assert_eq!(
        fs::read_to_string(lock.path()).unwrap(),
        format!("{}\n", std::process::id())
    );
}

#[test]
fn a_lock_file_that_cannot_be_created_is_not_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, "").unwrap();
    let err = StateLock::acquire(&file.join("state")).unwrap_err();
    assert!(matches!(err, InstanceError::Io { .. }), "{err:?}");
    assert!(!err.is_conflict());
}

#[test]
fn the_lock_file_holds_one_pid() {
    let check =
        |text: &str, expected: Option<u32>| assert_eq!(parse_holder(text), expected, "{text:?}");
    check("1234\n", Some(1234));
    check("  77  ", Some(77));
    check("", None);
    check("0\n", None);
    check("-5\n", None);
    check("12 34\n", None);
    check("pid=12\n", None);
    check("99999999999\n", None);
}

#[test]
fn a_ping_answer_names_the_other_instance() {
    let check = |answer: &str, expected: &str| {
        assert_eq!(
            OtherInstance::from_answer(answer.as_bytes()).to_string(),
            expected
        );
    };
    check(
        r#"{"type":"io.nats.micro.v1.ping_response","name":"mlx-worker","id":"w-1","version":"0.1.0","metadata":{"worker_id":"w-1"}}"#,
        "version 0.1.0",
    );
    check(
        r#"{"type":"io.nats.micro.v1.ping_response","name":"mlx-worker","id":"w-1","version":"0.2.0","metadata":{"worker_id":"w-1","hostname":"studio-2","pid":"4242"}}"#,
        "version 0.2.0, hostname=studio-2, pid=4242",
    );
    check("not json", "its answer is not a ping response");
    check(
        r#"{"type":"io.nats.micro.v1.ping_response"}"#,
        "its answer is not a ping response",
    );

    let long = "x".repeat(1000);
    let many: String = (0..20).map(|i| format!(r#","k{i:02}":"{long}""#)).collect();
    let answer = format!(
        r#"{{"type":"t","name":"n","id":"i","version":"{long}","metadata":{{"worker_id":"i"{many}}}}}"#
    );
    let shown = OtherInstance::from_answer(answer.as_bytes()).to_string();
    assert!(shown.len() < 1000, "{shown}");
    assert_eq!(shown.matches('=').count(), LABELS_SHOWN_MAX);
}

#[test]
fn the_refusals_say_what_to_do() {
    let locked = InstanceError::Locked {
        state_dir: PathBuf::from("/srv/mlx/.state"),
        holder: Some(4242),
    };
    insta::assert_snapshot!(locked, @"state directory /srv/mlx/.state is in use by another mlx-worker (pid 4242): one process per state directory; stop that process, or give this worker its own worker.stateDir");
    let unknown = InstanceError::Locked {
        state_dir: PathBuf::from(".state"),
        holder: None,
    };
    insta::assert_snapshot!(unknown, @"state directory .state is in use by another mlx-worker: one process per state directory; stop that process, or give this worker its own worker.stateDir");
    let live = InstanceError::Live {
        worker_id: "studio-1".to_owned(),
        other: OtherInstance::Ping {
            version: "0.1.0".to_owned(),
            labels: vec![],
        },
    };
    assert!(live.is_conflict());
    insta::assert_snapshot!(live, @"another mlx-worker already answers for worker id studio-1 (version 0.1.0): one process per worker id; stop that worker, or give this one another id (worker.workerId; on a machine cloned from another, delete worker-id in the state directory)");
}

#[test]
fn the_ping_subject_is_the_one_only_this_id_answers() {
    assert_eq!(ping_subject("studio-1"), "$SRV.PING.mlx-worker.studio-1");
    assert!(
        crate::protocol::service::subjects("studio-1")
            .iter()
            .any(|(subject, verb)| *verb == "PING" && *subject == ping_subject("studio-1"))
    );
}
