//! The neighbour table, on a bridge of this test's own (needs root, as the Docker tests do).

use std::net::Ipv4Addr;
use std::process::Command;

use skiff_docker::neighbour::{self, Endpoint};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's `ip` (Debian's iproute2 package)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bridge with an address, removed when dropped.
struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn an_address_is_announced_as_stale_and_forgotten() {
    let name = format!("sknb{}", std::process::id() % 100_000);
    let _ = Command::new("ip")
        .args(["link", "del", &name])
        .stderr(std::process::Stdio::null())
        .status();
    ip(&["link", "add", &name, "type", "bridge"]);
    let _bridge = Bridge(name.clone());
    ip(&["addr", "add", "10.251.77.1/24", "dev", &name]);
    ip(&["link", "set", &name, "up"]);

    let e = Endpoint::parse("10.251.77.9", "02:42:0a:fb:4d:09").expect("an endpoint");
    assert_eq!(
        ip(&["-4", "neigh", "show", "10.251.77.9", "dev", &name]).trim(),
        ""
    );
    neighbour::announce(&e).expect("announced");
    let entry = ip(&["-4", "neigh", "show", "10.251.77.9", "dev", &name]);
    assert!(
        entry.contains("lladdr 02:42:0a:fb:4d:09") && entry.contains("STALE"),
        "{entry}"
    );
    // Announced again with another address (a new container on the old one's address): replaced.
    let e2 = Endpoint::parse("10.251.77.9", "02:42:0a:fb:4d:10").expect("an endpoint");
    neighbour::announce(&e2).expect("replaced");
    let entry = ip(&["-4", "neigh", "show", "10.251.77.9", "dev", &name]);
    assert!(entry.contains("lladdr 02:42:0a:fb:4d:10"), "{entry}");

    neighbour::forget(e.ip).expect("forgotten");
    assert_eq!(
        ip(&["-4", "neigh", "show", "10.251.77.9", "dev", &name]).trim(),
        ""
    );
    neighbour::forget(e.ip).expect("nothing to forget is no error");

    // An address on no network of this host's: refused, nothing written.
    let far = Endpoint {
        ip: Ipv4Addr::new(203, 0, 113, 250),
        mac: [2, 0, 0, 0, 0, 1],
    };
    assert!(matches!(
        neighbour::announce(&far),
        Err(neighbour::AnnounceError::NoInterface(_))
    ));
}
