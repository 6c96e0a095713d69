//! `http/wait`: GET a URL until it answers with the expected status, or the time is up (a health
//! check on the node itself).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ActionDef, DurationText, HttpStatus, HttpUrl, Val};

pub struct Wait;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitWith {
    /// The `http://` URL to request with GET.
    pub url: Val<HttpUrl>,
    /// The status that counts as ready (default 200).
    pub status: Option<Val<HttpStatus>>,
    /// How long to keep trying (default 30s).
    pub timeout: Option<Val<DurationText>>,
    /// The pause between attempts (default 250ms).
    pub interval: Option<Val<DurationText>>,
}

impl WaitWith {
    pub const DEFAULT_STATUS: u16 = 200;
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);
}

#[derive(Debug, Default, Serialize)]
pub struct WaitOutputs {
    /// The status the URL answered with.
    pub status: u16,
    /// How many requests it took.
    pub attempts: u32,
}

impl ActionDef for Wait {
    const NAME: &'static str = "http/wait";
    const DOC: &'static str =
        "Wait until an HTTP URL answers with the expected status (a health check).";
    type With = WaitWith;
    type Outputs = WaitOutputs;
    const OUTPUTS: &'static [&'static str] = &["status", "attempts"];
}
