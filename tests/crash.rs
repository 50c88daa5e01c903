//! Crash safety of the real binary: killed with SIGKILL at random points while it fills its cache
//! from a real registry, and restarted on the same cache each time, it never keeps a corrupt
//! object, and every image pulls whole through it afterwards.

mod support;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// Rounds of start, pull, kill -9.
const ROUNDS: u64 = 16;

/// A small deterministic generator (xorshift64*): the same seed kills at the same moments.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The `.part` files of downloads in progress (or of dead runs not yet cleaned up).
fn partials(cache: &std::path::Path) -> usize {
    walkdir::WalkDir::new(cache.join("tmp"))
        .into_iter()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
        .count()
}

/// Runs `regproxy cache verify` on `cache`: its exit status and what it printed.
fn verify(cache: &std::path::Path) -> (bool, String) {
    let out = run_with_timeout(
        std::process::Command::new(env!("CARGO_BIN_EXE_regproxy"))
            .env_remove("REGPROXY_CONFIG")
            .args(["cache", "verify", "--cache-dir"])
            .arg(cache),
        CMD_TIMEOUT,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The number of objects `cache verify` says it checked.
fn checked(report: &str) -> usize {
    report
        .lines()
        .find_map(|l| l.split_once(" object(s) checked")?.0.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {report:?}"))
}

#[test]
fn kill_9_during_fills_never_leaves_a_corrupt_object() {
    let started = Instant::now();
    let seed = std::env::var("REGPROXY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0ffee_u64);
    eprintln!("seed {seed} (set REGPROXY_CRASH_SEED to replay another)");
    let mut rng = Rng(seed | 1);
    let dir = TestDir::new();
    let registry = Registry::start(dir.join("registry"));
    // Four images of two 4 MiB layers, and the first again under another repository, so that two
    // clients sometimes share a download (one upstream fetch, joined); and one to time a pull.
    let mut images: Vec<(String, PathBuf)> = (0..5)
        .map(|i| {
            let src = dir.join(format!("src{i}"));
            mkimage(&src, 2, "4MiB", None, 900 + i);
            let repo_tag = format!("crash/img{i}:v1");
            push(&src, &registry, &repo_tag, false);
            (repo_tag, src)
        })
        .collect();
    let (calibration, _) = images.pop().unwrap();
    push(&images[0].1, &registry, "crash/twin:v1", false);
    images.push(("crash/twin:v1".into(), images[0].1.clone()));
    let state = dir.join("state");
    let cache = state.join("cache");

    // Kills are spread over the time a cold pull takes on this machine, measured on a cache of
    // its own: most land inside a download, some after a commit.
    let cold_pull = {
        let proxy = ProxyProcess::start(&dir.join("calibration"), &registry);
        let t = Instant::now();
        let dst = oci_ref(dir.join("calibration/pulled"));
        let out = run_with_timeout(
            &mut proxy.skopeo_copy(&registry.image(&calibration), &dst),
            CMD_TIMEOUT,
        );
        assert_success(&out, "the timing pull");
        t.elapsed()
    };
    let max_delay_ms = (cold_pull.as_millis() as u64 * 6 / 5).max(50);
    eprintln!("a cold pull takes {cold_pull:?}; kills within {max_delay_ms} ms");

    let mut killed_mid_download = 0;
    for round in 0..ROUNDS {
        let mut proxy = ProxyProcess::start(&state, &registry);
        let picks = if round % 2 == 0 {
            vec![round as usize % images.len()]
        } else {
            // Two at once; on some rounds the twin and its original.
            let a = rng.below(images.len() as u64) as usize;
            vec![
                a,
                (a + 1 + rng.below(images.len() as u64 - 1) as usize) % images.len(),
            ]
        };
        let pulls_at = Instant::now();
        let mut pulls: Vec<Child> = picks
            .iter()
            .enumerate()
            .map(|(n, &i)| {
                let dst = oci_ref(dir.join(format!("round{round}-{n}")));
                proxy
                    .skopeo_copy(&registry.image(&images[i].0), &dst)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("starting skopeo")
            })
            .collect();
        let delay = Duration::from_millis(max_delay_ms / 10 + rng.below(max_delay_ms));
        if round % 4 == 3 {
            // At any moment of the pull.
            thread::sleep(delay);
        } else {
            // Inside a download, at a random point of it: on a loaded machine a kill at a
            // random moment of the pull lands mostly outside the short downloads.
            let until = Instant::now() + Duration::from_secs(10);
            while partials(&cache) == 0 && Instant::now() < until {
                thread::sleep(Duration::from_millis(1));
            }
            thread::sleep(Duration::from_millis(rng.below(20)));
        }
        proxy.kill_9();
        let killed_after = pulls_at.elapsed();
        let in_progress = partials(&cache);
        killed_mid_download += u64::from(in_progress > 0);
        for p in &mut pulls {
            let _ = p.kill();
            let _ = p.wait();
        }
        eprintln!(
            "round {round}: {picks:?} killed after {killed_after:?}, {in_progress} download(s) cut"
        );
    }
    assert!(
        killed_mid_download >= ROUNDS / 4,
        "only {killed_mid_download} of {ROUNDS} kills landed during a download: the test does not \
         test what it says (make the layers larger or the delays shorter)"
    );

    // Nothing the kills left behind is corrupt.
    let (ok, report) = verify(&cache);
    assert!(ok && report.contains(", 0 corrupt"), "{report}");
    eprintln!("after the kills: {}", report.trim());

    // Every image pulls whole through a restarted proxy, then the cache holds each object of
    // each image (four manifests, four configs, eight layers), all verified.
    let mut proxy = ProxyProcess::start(&state, &registry);
    for (i, (repo_tag, src)) in images.iter().enumerate() {
        let dst = dir.join(format!("final{i}"));
        let out = run_with_timeout(
            &mut proxy.skopeo_copy(&registry.image(repo_tag), &oci_ref(&dst)),
            CMD_TIMEOUT,
        );
        assert_success(&out, &format!("pulling {repo_tag} after the crashes"));
        assert_same_image(src, &dst);
    }
    let status = proxy.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", proxy.log());
    let (ok, report) = verify(&cache);
    assert!(ok && report.contains(", 0 corrupt"), "{report}");
    assert!(checked(&report) >= 16, "{report}");
    eprintln!("took {:?}", started.elapsed());
}
