// Goal: the server starter passes each option as nats-server's flag, finds the binary or says
// how to install it, and the server it starts admits clients, goes away when killed and comes
// back on the same port.
// Method: the options rendered to arguments; a search over temporary directories; a real
// nats-server (it must be installed: the test fails, saying how, when it is not).

use std::time::Duration;

use super::*;

#[test]
fn each_option_becomes_its_flag() {
    assert!(NatsOptions::new().args().is_empty());
    let tls = ServerTls {
        cert: "s.pem".into(),
        key: "s-key.pem".into(),
        client_ca: Some("ca.pem".into()),
    };
    let args = NatsOptions::new()
        .tls(tls.clone())
        .user_password("u", "p")
        .token("t")
        .config_file(Path::new("x.conf"))
        .args();
    let expected = [
        "--tls",
        "--tlscert",
        "s.pem",
        "--tlskey",
        "s-key.pem",
        "--tlsverify",
        "--tlscacert",
        "ca.pem",
        "--user",
        "u",
        "--pass",
        "p",
        "--auth",
        "t",
        "-c",
        "x.conf",
    ];
    assert_eq!(args, expected.map(OsString::from));
    // Without a client CA, clients are not asked for a certificate.
    let args = NatsOptions::new()
        .tls(ServerTls {
            client_ca: None,
            ..tls
        })
        .args();
    assert_eq!(
        args,
        expected[..5].iter().map(OsString::from).collect::<Vec<_>>()
    );
}

#[test]
fn the_binary_is_the_first_found_or_the_way_to_install_it() {
    let empty = tempfile::tempdir().unwrap();
    let with = tempfile::tempdir().unwrap();
    let also = tempfile::tempdir().unwrap();
    for dir in [&with, &also] {
        std::fs::write(dir.path().join("nats-server"), "").unwrap();
    }
    let dirs = [empty.path(), with.path(), also.path()].map(Path::to_path_buf);
    assert_eq!(find_nats_server(dirs), Ok(with.path().join("nats-server")));
    let missing = find_nats_server([empty.path().to_path_buf()]).unwrap_err();
    assert!(missing.contains("run ci/setup.sh"), "{missing}");
}

#[tokio::test]
async fn a_started_server_admits_clients_and_restarts_on_its_port() {
    let mut server = NatsServer::start().await;
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port));
    let client = async_nats::connect(server.url()).await.unwrap();
    client.flush().await.unwrap();
    drop(client);

    server.kill().await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", server.port)).is_err(),
        "a killed server still listens"
    );
    let port = server.port;
    server.restart().await;
    assert_eq!(server.port, port);
    let client = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(server.url()))
        .await
        .unwrap()
        .unwrap();
    client.flush().await.unwrap();
}
