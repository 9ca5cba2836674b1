// Goal: the record of the embedded server reads back what was written and nothing else, and it
// recognises its server only: not a process that later got the same pid, not another program,
// not a server on another port.
// Method: literal record texts and process views; one look at this test process itself.

use super::*;

fn server(started: u64, command: &[&str]) -> SeenProcess {
    SeenProcess {
        started,
        command: command.iter().map(|a| (*a).to_owned()).collect(),
    }
}

const RECORD: ServerRecord = ServerRecord {
    pid: 4242,
    port: 4222,
    started: 1_795_724_486,
};

#[test]
fn a_record_reads_back_as_written() {
    assert_eq!(RECORD.render(), "pid=4242\nport=4222\nstarted=1795724486\n");
    assert_eq!(ServerRecord::parse(&RECORD.render()), Some(RECORD));
}

#[test]
fn a_record_is_three_numbered_keys_and_nothing_else() {
    let check = |text: &str, expected: Option<ServerRecord>| {
        assert_eq!(ServerRecord::parse(text), expected, "{text:?}");
    };
    check("started=1795724486\n\n  pid=4242 \nport=4222", Some(RECORD));
    check("", None);
    check("pid=4242\nport=4222\n", None);
    check("pid=0\nport=4222\nstarted=1795724486\n", None);
    check("pid=-1\nport=4222\nstarted=1795724486\n", None);
    check("pid=4242\nport=70000\nstarted=1795724486\n", None);
    check("pid=4242\nport=4222\nstarted=soon\n", None);
    check("pid=4242\npid=4243\nport=4222\nstarted=1795724486\n", None);
    check("pid=4242\nport=4222\nstarted=1795724486\nhost=x\n", None);
    check("4242\n", None);
}

#[test]
fn a_record_describes_its_own_server_only() {
    let check = |seen: SeenProcess, expected: bool| {
        assert_eq!(RECORD.describes(&seen), expected, "{seen:?}");
    };
    let started = RECORD.started;
    check(
        server(
            started,
            &["/usr/sbin/nats-server", "-a", "127.0.0.1", "-p", "4222"],
        ),
        true,
    );
    check(server(started, &["nats-server", "-p", "4222"]), true);
    // The pid went to a later process.
    check(
        server(
            started + 1,
            &["/usr/sbin/nats-server", "-a", "127.0.0.1", "-p", "4222"],
        ),
        false,
    );
    // Another program, even with the same arguments.
    check(server(started, &["/usr/bin/python3", "-p", "4222"]), false);
    check(
        server(started, &["/opt/nats-server-wrapper", "-p", "4222"]),
        false,
    );
    // Another port, or none given.
    check(server(started, &["nats-server", "-p", "4223"]), false);
    check(server(started, &["nats-server", "-a", "127.0.0.1"]), false);
    check(server(started, &["nats-server", "4222", "-p"]), false);
    check(server(started, &[]), false);
}

#[test]
fn a_running_process_is_seen_with_its_start_time_and_command() {
    let me = look_up(std::process::id()).expect("this process is seen");
    assert!(me.started > 1_600_000_000, "{me:?}");
    assert!(!me.command.is_empty(), "{me:?}");
    assert!(!RECORD.describes(&me));
    assert_eq!(look_up(u32::MAX - 1), None);
}
