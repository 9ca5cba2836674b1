// Goal: a running worker announces what the real host probe sees, and its heartbeats report
// live CPU use that moves with the load.
// Method: a worker with the production probe (`hardware::detect`) on a real nats-server; its
// registration is compared with the probe's own profile; two threads then burn both cores for
// a bounded time while the test watches the heartbeats.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mlx_worker::hardware;
use mlx_worker::protocol::{WorkerHeartbeat, WorkerRegistration};
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker_sim::{SimEngine, SimEngineConfig};

use testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_carries_the_probe_profile_and_cpu_moves_under_load() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut registrations = client.subscribe("worker.register").await;
    let mut heartbeats = client.subscribe("worker.heartbeat").await;
    let config = test_config(&server.url(), "");
    let probe = hardware::detect();
    let profile = probe.profile().await;
    let transport = NatsTransport::connect(&config.nats).await.unwrap();
    let worker = RunningWorker::start_with(
        "w-probe",
        config.node.clone(),
        Arc::new(SimEngine::new(SimEngineConfig::default())),
        vec![],
        Arc::new(transport),
        probe,
    );

    let msg = within("the registration", registrations.next())
        .await
        .unwrap();
    let reg: WorkerRegistration = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reg.hardware.cpu_cores, profile.cpu_cores);
    assert_eq!(reg.hardware.chip_model, profile.chip_model);
    assert_eq!(reg.hardware.os_version, profile.os_version);
    assert_eq!(reg.hardware.unified_memory_gb, profile.memory_gb() as f64);
    assert!(reg.hardware.cpu_cores > 0 && reg.hardware.unified_memory_gb > 0.0);
    assert!(!reg.capabilities.supported_model_tiers.is_empty());

    let mut next_cpu = async || {
        let msg = within("a heartbeat", heartbeats.next()).await.unwrap();
        let hb: WorkerHeartbeat = serde_json::from_slice(&msg.payload).unwrap();
        assert!(hb.metrics.memory_used_gb > 0.0);
        hb.metrics.cpu_usage_percent
    };
    let mut baseline = f64::MAX;
    for _ in 0..5 {
        baseline = baseline.min(next_cpu().await);
    }

    let burning = Arc::new(AtomicBool::new(true));
    let burners: Vec<_> = (0..std::thread::available_parallelism().map_or(2, |n| n.get()))
        .map(|_| {
            let burning = burning.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while burning.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    // At most 50 heartbeats (10 s at 200 ms) for the load to show.
    let mut peak = 0.0f64;
    for _ in 0..50 {
        peak = peak.max(next_cpu().await);
        if peak >= 90.0 {
            break;
        }
    }
    burning.store(false, Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    assert!(
        peak >= 90.0,
        "CPU under load peaked at {peak}% (baseline {baseline}%)"
    );
    assert!(peak > baseline, "CPU moved from {baseline}% to {peak}%");
    worker.stop().await;
}
