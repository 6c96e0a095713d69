//! The distributed queue against a real redis-server: routing by label set, a new label set
//! served at once, jobs given back, lost jobs found again.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use skiff_core::dispatch::{Queue, RunJob};
use skiff_core::queue::JobHandler;
use skiff_core::run::RunId;
use skiff_redis::queue::{Consumer, RedisQueue};
use skiff_redis::testing::RedisServer;
use tokio_util::sync::CancellationToken;

/// Records the jobs it is given; gives back the first `refuse` of them.
#[derive(Default)]
struct Taken {
    jobs: Mutex<Vec<RunJob>>,
    refuse: Mutex<usize>,
}

#[async_trait]
impl JobHandler for Taken {
    async fn handle(&self, job: RunJob) -> Result<(), String> {
        {
            let mut refuse = self.refuse.lock().expect("lock");
            if *refuse > 0 {
                *refuse -= 1;
                return Err("not now".into());
            }
        }
        self.jobs.lock().expect("lock").push(job);
        Ok(())
    }
}

impl Taken {
    fn runs(&self) -> Vec<String> {
        self.jobs
            .lock()
            .expect("lock")
            .iter()
            .map(|j| j.run_id.clone())
            .collect()
    }

    async fn wait_for(&self, n: usize) -> Vec<String> {
        for _ in 0..500 {
            if self.jobs.lock().expect("lock").len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.runs()
    }
}

async fn queue(server: &RedisServer) -> (redis::Client, RedisQueue) {
    let client = redis::Client::open(server.url()).expect("client");
    let conn = redis::aio::ConnectionManager::new(client.clone())
        .await
        .expect("connect");
    (client, RedisQueue::new(conn))
}

fn consumer(client: &redis::Client, name: &str, labels: &[&str]) -> Consumer {
    Consumer {
        client: client.clone(),
        name: name.into(),
        labels: labels
            .iter()
            .map(|l| l.to_string())
            .collect::<BTreeSet<_>>(),
        slots: 4,
    }
}

fn info(name: &str, labels: &[&str]) -> skiff_redis::workers::WorkerInfo {
    skiff_redis::workers::WorkerInfo {
        v: 1,
        name: name.into(),
        host: "here".into(),
        pid: 1,
        labels: labels.iter().map(|l| l.to_string()).collect(),
        version: "test".into(),
        job_version: 1,
        actions: Vec::new(),
        secrets: Vec::new(),
        concurrency: 4,
        embedded: false,
        lease_ms: 15_000,
        started_at: chrono::Utc::now(),
    }
}

fn job(labels: &[&str]) -> RunJob {
    RunJob::with_labels(
        &RunId::generate(),
        labels.iter().map(|l| l.to_string()).collect(),
    )
}

#[tokio::test]
async fn a_job_goes_only_to_a_worker_with_all_its_labels() {
    let server = RedisServer::start();
    let (client, queue) = queue(&server).await;
    let stop = CancellationToken::new();
    let plain = Arc::new(Taken::default());
    let docker = Arc::new(Taken::default());
    // Registered workers are poked when a label set appears.
    let registry = skiff_redis::workers::Registry::new(
        redis::aio::ConnectionManager::new(client.clone())
            .await
            .expect("connect"),
    );
    for (name, labels) in [
        ("plain", vec!["local"]),
        ("docker", vec!["docker", "linux"]),
    ] {
        registry
            .register(&info(name, &labels), false)
            .await
            .expect("register");
    }
    let a = tokio::spawn(consumer(&client, "plain", &["local"]).run(plain.clone(), stop.clone()));
    let b = tokio::spawn(
        consumer(&client, "docker", &["docker", "linux"]).run(docker.clone(), stop.clone()),
    );
    // The label sets are new: the workers are poked, not left to find them at their next look.
    let anywhere = job(&[]);
    let needs_docker = job(&["linux", "docker"]);
    let needs_aws = job(&["aws"]);
    let started = std::time::Instant::now();
    for j in [&anywhere, &needs_docker, &needs_aws] {
        queue.push(j.clone()).await.expect("push");
    }
    for _ in 0..500 {
        if plain.runs().len() + docker.runs().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut all = plain.runs();
    all.extend(docker.runs());
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "new label sets waited for the workers' next look: {:?}",
        started.elapsed()
    );
    assert_eq!(
        docker
            .runs()
            .iter()
            .filter(|r| **r == needs_docker.run_id)
            .count(),
        1
    );
    assert!(!plain.runs().contains(&needs_docker.run_id));
    assert_eq!(all.iter().filter(|r| **r == anywhere.run_id).count(), 1);
    assert!(!all.contains(&needs_aws.run_id), "no worker has `aws`");
    let depths = queue.depths().await.expect("depths");
    assert!(depths.contains(&(vec!["aws".to_string()], 1)), "{depths:?}");
    stop.cancel();
    a.await.expect("join").expect("consumer");
    b.await.expect("join").expect("consumer");
}

#[tokio::test]
async fn jobs_are_taken_in_order_and_a_refused_one_is_taken_again() {
    let server = RedisServer::start();
    let (client, queue) = queue(&server).await;
    let jobs: Vec<RunJob> = (0..20).map(|_| job(&[])).collect();
    for j in &jobs {
        queue.push(j.clone()).await.expect("push");
    }
    let taken = Arc::new(Taken::default());
    *taken.refuse.lock().expect("lock") = 1;
    let stop = CancellationToken::new();
    let mut one = consumer(&client, "one", &[]);
    one.slots = 1;
    let worker = tokio::spawn(one.run(taken.clone(), stop.clone()));
    let got = taken.wait_for(20).await;
    let want: Vec<String> = jobs.iter().map(|j| j.run_id.clone()).collect();
    assert_eq!(
        got, want,
        "one slot takes the jobs in the order they were pushed"
    );
    stop.cancel();
    worker.await.expect("join").expect("consumer");
}

#[tokio::test]
async fn a_waiting_run_whose_job_was_lost_gets_a_new_one() {
    let server = RedisServer::start();
    let (_client, queue) = queue(&server).await;
    let kept = job(&["docker"]);
    queue.push(kept.clone()).await.expect("push");
    let lost = RunId::generate().to_string();
    let waiting = vec![
        (kept.run_id.clone(), vec!["docker".to_string()]),
        (lost.clone(), vec!["docker".to_string()]),
    ];
    assert_eq!(queue.requeue_missing(&waiting).await.expect("requeue"), 1);
    assert_eq!(queue.requeue_missing(&waiting).await.expect("requeue"), 0);
    let depths = queue.depths().await.expect("depths");
    assert_eq!(depths, vec![(vec!["docker".to_string()], 2)]);
}

#[tokio::test]
async fn the_queue_works_over_tls_with_a_private_certificate_authority() {
    let server = RedisServer::start_tls();
    let url = server.tls_url().expect("tls");
    let root = std::fs::read(server.ca_file().expect("ca")).expect("ca");
    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root),
        },
    )
    .expect("client");
    let conn = redis::aio::ConnectionManager::new(client.clone())
        .await
        .expect("a TLS connection");
    let queue = RedisQueue::new(conn);
    queue.push(job(&["tls"])).await.expect("push over TLS");
    assert_eq!(
        queue.depths().await.expect("depths"),
        vec![(vec!["tls".to_string()], 1)]
    );
    // Without the authority, the certificate is refused.
    let untrusted = redis::Client::open(url.as_str()).expect("client");
    assert!(
        untrusted.get_multiplexed_async_connection().await.is_err(),
        "a certificate no trusted authority signed is refused"
    );
}
