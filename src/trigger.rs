//! `skiff trigger`: start a run on a server over its API, and optionally follow it live.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Value, json};

#[derive(clap::Args, Debug)]
pub struct TriggerArgs {
    /// The pipeline to run
    #[arg(value_name = "PIPELINE")]
    pipeline: String,
    /// A param for the run, as NAME=VALUE (repeat for more)
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE", value_parser = crate::cli_run::parse_param)]
    params: Vec<(String, String)>,
    /// Follow the run: print its log live and exit with its outcome (0 when it succeeds)
    #[arg(long, short)]
    follow: bool,
    /// The server's URL (default: the server last started on the data folder, else
    /// http://127.0.0.1:8080)
    #[arg(long, env = "SKIFF_SERVER", value_name = "URL")]
    server: Option<String>,
    /// The data folder, to find the server by when --server is not given
    #[arg(
        long = "data",
        env = "SKIFF_DATA",
        default_value = ".skiff",
        value_name = "DIR"
    )]
    data: std::path::PathBuf,
    /// An API token (`skiff token NAME`, or Settings in the web UI), or the server's
    /// SKIFF_ADMIN_TOKEN
    #[arg(
        long,
        env = "SKIFF_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// The message of a JSON error body, with its field errors.
fn error_text(body: &Value) -> String {
    let mut text = body["error"]["message"]
        .as_str()
        .unwrap_or("request failed")
        .to_string();
    if let Some(fields) = body["error"]["fields"].as_array() {
        for f in fields {
            text.push_str(&format!(
                "\n  param `{}`: {}",
                f["param"].as_str().unwrap_or("?"),
                f["message"].as_str().unwrap_or("")
            ));
        }
    }
    text
}

pub fn main(args: TriggerArgs) -> anyhow::Result<ExitCode> {
    let token = args
        .token
        .clone()
        .context("no token: pass --token or set SKIFF_TOKEN (create one under Settings)")?;
    let server = args
        .server
        .clone()
        .or_else(|| crate::read_server_url(&args.data))
        .unwrap_or_else(|| "http://127.0.0.1:8080".to_string());
    let base = server.trim_end_matches('/').to_string();
    let auth = format!("Bearer {token}");
    let params: BTreeMap<String, String> = args.params.iter().cloned().collect();
    let url = format!("{base}/api/pipelines/{}/runs", args.pipeline);
    let mut response = agent()
        .post(&url)
        .header("authorization", &auth)
        .send_json(json!({ "params": params }))
        .with_context(|| format!("reaching {base}"))?;
    let status = response.status();
    let body: Value = response.body_mut().read_json().unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{} ({status})", error_text(&body));
    }
    let id = body["id"]
        .as_str()
        .context("the server's answer has no run id")?
        .to_string();
    eprintln!(
        "skiff: started {} #{} ({base}/runs/{id})",
        args.pipeline, body["number"]
    );
    if !args.follow {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    follow(&base, &auth, &id)
}

/// Prints the run's log from its event stream, reconnecting from the last offset if the stream
/// drops, and returns the run's outcome as the exit code.
fn follow(base: &str, auth: &str, id: &str) -> anyhow::Result<ExitCode> {
    let mut offset = 0u64;
    let stdout = std::io::stdout();
    for attempt in 0..10 {
        let url = format!("{base}/api/runs/{id}/logs/stream?offset={offset}");
        let mut response = match agent().get(&url).header("authorization", auth).call() {
            Ok(r) => r,
            Err(e) if attempt < 9 => {
                eprintln!("skiff: {e}; reconnecting");
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if !response.status().is_success() {
            let body: Value = response.body_mut().read_json().unwrap_or(Value::Null);
            bail!("{}", error_text(&body));
        }
        let reader = BufReader::new(response.body_mut().as_reader());
        let mut event = String::new();
        for line in reader.lines() {
            let line = line.context("reading the event stream")?;
            if let Some(name) = line.strip_prefix("event: ") {
                event = name.to_string();
            } else if let Some(data) = line.strip_prefix("data: ") {
                let value: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                match event.as_str() {
                    "log" => {
                        let mut out = stdout.lock();
                        let _ = out.write_all(value["text"].as_str().unwrap_or("").as_bytes());
                        let _ = out.flush();
                        offset = value["offset"].as_u64().unwrap_or(offset)
                            + value["text"].as_str().map_or(0, |t| t.len() as u64);
                    }
                    "step" if value["status"] != "running" && value["status"] != "pending" => {
                        eprintln!(
                            "skiff: step {} {}",
                            value["name"].as_str().unwrap_or("?"),
                            value["status"].as_str().unwrap_or("?")
                        );
                    }
                    "end" => {
                        let status = value["status"].as_str().unwrap_or("?");
                        eprintln!("skiff: run {status}");
                        return Ok(if status == "succeeded" {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::FAILURE
                        });
                    }
                    _ => {}
                }
            } else if let Some(next) = line.strip_prefix("id: ") {
                offset = next.trim().parse().unwrap_or(offset);
            }
        }
    }
    bail!("lost the event stream too often")
}
