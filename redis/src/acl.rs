//! The Redis users of a distributed skiff, by what each may reach. Workers run untrusted builds,
//! possibly on machines across the internet: their user reaches only `skiff:d:*` (runs, steps,
//! logs, the ledger, the queue, the worker registry) and the channels under it, never
//! credentials (`skiff:auth:*`) or the server's own state (`skiff:s:*`), and none of the
//! commands that list or read keys wholesale or change the server.

/// The server's rules: every skiff key and channel; no administration of Redis itself.
pub const SERVER_RULES: &str = "resetchannels ~skiff:* &skiff:* +@all -@dangerous";

/// The workers' rules: `skiff:d:*` only, and nothing that lists keys.
pub const WORKER_RULES: &str =
    "resetchannels ~skiff:d:* &skiff:d:* +@all -@dangerous -scan -randomkey";

/// The user names the deployment files use.
pub const SERVER_USER: &str = "skiff-server";
pub const WORKER_USER: &str = "skiff-worker";

/// `ACL SETUSER` commands (one per line, words separated by spaces) that create both users
/// with these passwords.
pub fn users(server_password: &str, worker_password: &str) -> Vec<String> {
    vec![
        format!("ACL SETUSER {SERVER_USER} reset on >{server_password} {SERVER_RULES}"),
        format!("ACL SETUSER {WORKER_USER} reset on >{worker_password} {WORKER_RULES}"),
    ]
}

/// Lines of a Redis ACL file (`aclfile`) for both users, with their passwords' SHA-256 in hex.
pub fn acl_file(server_sha256: &str, worker_sha256: &str) -> String {
    format!(
        "user {SERVER_USER} on #{server_sha256} {SERVER_RULES}\nuser {WORKER_USER} on #{worker_sha256} {WORKER_RULES}\nuser default off\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deployment files make the users with these very rules.
    #[test]
    fn the_deployment_files_grant_what_this_module_says() {
        let script = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/make-secrets"),
        )
        .expect("deploy/make-secrets");
        for (user, rules) in [(SERVER_USER, SERVER_RULES), (WORKER_USER, WORKER_RULES)] {
            let line = script
                .lines()
                .find(|l| l.starts_with(&format!("user {user} on ")))
                .unwrap_or_else(|| panic!("make-secrets makes no {user}"));
            assert!(line.ends_with(rules), "{user}: {line} vs {rules}");
        }
        assert!(
            script.contains("user default off"),
            "the default user is off"
        );
    }
}
