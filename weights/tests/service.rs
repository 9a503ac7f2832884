//! The weights service over a real UNIX socket with real memfds: leases follow the
//! peer, quiesce keeps the address range, resume maps the same bytes at the same
//! address, and what would lose a worker's memory is refused.

use std::sync::Arc;
use std::time::Duration;

use snapreg_weights::{BackendKind, Service, ServiceConfig, WeightsClient};

fn start() -> (tempfile::TempDir, WeightsClient) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("w.sock");
    let service: Arc<Service> = Service::new(ServiceConfig {
        socket: socket.clone(),
        backend: BackendKind::Memfd,
        device: 0,
    })
    .unwrap();
    let listener = service.bind().unwrap();
    std::thread::spawn(move || service.serve(listener));
    (dir, WeightsClient::new(socket))
}

fn reserved_prot_none(addr: u64) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|l| {
        let (range, rest) = l.split_once(' ').unwrap();
        let start = u64::from_str_radix(range.split('-').next().unwrap(), 16).unwrap();
        start == addr && rest.starts_with("---p")
    })
}

fn maps_mention_weights() -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .contains("/memfd:snapreg-weights:model/w")
}

#[test]
fn leases_quiesce_and_resume_at_the_same_address() {
    let (_dir, client) = start();
    let me = std::process::id();
    let loader = client.create("model/w", 3 << 20).unwrap();
    let bytes: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    loader.mapping().write_at(0, &bytes).unwrap();

    // Not sealed yet: a reader waits, then gets a clear answer.
    let err = client
        .attach("model/w", Duration::from_millis(100))
        .err()
        .unwrap();
    assert!(err.to_string().contains("still being filled"), "{err}");
    client.seal("model/w", None).unwrap();
    drop(loader);

    let mut w = client.attach("model/w", Duration::ZERO).unwrap();
    assert_eq!(w.host_slice().unwrap(), &bytes[..]);
    let listing = client.list().unwrap();
    assert_eq!(listing.buffers[0].leases, vec![me]);
    // The service runs in this test process (its memfds are in our fd table): look
    // at the mappings only.
    assert!(maps_mention_weights());

    // Held: it cannot be replaced under the worker.
    let err = client.fill_buffer("model/w", 3 << 20).err().unwrap();
    assert!(err.to_string().contains("mapped by PID"), "{err}");

    let addr = w.addr();
    client.quiesce(&mut [&mut w], libc::SIGUSR2).unwrap();
    assert!(w.host_slice().is_none());
    assert!(reserved_prot_none(addr), "the address range was not kept");
    assert!(!maps_mention_weights());
    let listing = client.list().unwrap();
    assert!(listing.buffers[0].leases.is_empty());
    assert_eq!(listing.quiesced[0].pid, me);
    assert_eq!(listing.quiesced[0].signal, libc::SIGUSR2);
    assert_eq!(listing.quiesced[0].names, vec!["model/w".to_string()]);

    client.resume(&mut [&mut w], Duration::ZERO).unwrap();
    assert_eq!(w.addr(), addr);
    assert_eq!(w.host_slice().unwrap(), &bytes[..]);
    let listing = client.list().unwrap();
    assert_eq!(listing.buffers[0].leases, vec![me]);
    assert!(listing.quiesced.is_empty());
}

#[test]
fn bad_names_and_missing_buffers_are_refused_clearly() {
    let (_dir, client) = start();
    for bad in ["../etc", "/abs", "a//b", "", "a b"] {
        assert!(client.create(bad, 4096).is_err(), "{bad:?} accepted");
    }
    let err = client.attach("nope", Duration::ZERO).err().unwrap();
    assert!(err.to_string().contains("no buffer named nope"), "{err}");
    let gone = WeightsClient::new("/nonexistent/w.sock");
    let err = gone.list().err().unwrap();
    assert!(err.to_string().contains("weights serve --socket"), "{err}");
}
