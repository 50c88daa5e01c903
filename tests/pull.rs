//! End-to-end pulls: skopeo → regproxy (intercepting `registry.test`) → a real registry.
//!
//! skopeo trusts only the proxy's CA, so a pull that succeeds went through the interception (a
//! blind tunnel would present the registry's certificate, which skopeo does not trust).

mod support;

use support::*;

/// A single-arch image with three layers: the copy through the proxy is byte-identical (same
/// manifest digest, same blobs) and every layer was fetched from the registry.
#[test]
fn pulls_three_layer_image_through_proxy() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 3, "512KiB", None, 1);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/img:latest", false);

    let proxy = Proxy::for_registry(&registry);
    let dst = dir.join("dst");
    skopeo_copy_via(
        &proxy,
        &registry.image("test/img:latest"),
        &oci_ref(&dst),
        false,
    );

    assert_eq!(oci_index_digest(&dst), digest);
    assert_same_image(&src, &dst);
    let layers = oci_layers(&dst, &digest);
    assert_eq!(layers.len(), 3);
    for layer in &layers {
        assert!(
            registry.blob_gets(layer) >= 1,
            "no upstream GET of {layer}: {:#?}",
            registry.access_log()
        );
    }

    let raw = inspect_raw_via(&proxy, &registry.image("test/img:latest"));
    assert_eq!(
        sha256_digest(&raw),
        digest,
        "manifest bytes served through the proxy differ"
    );
}

/// A multi-arch index: `skopeo copy --all` through the proxy keeps the index digest and copies
/// every platform's manifest, config and layers unchanged.
#[test]
fn pulls_multi_arch_index_through_proxy() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let index_digest = mkimage(&src, 2, "256KiB", Some("linux/amd64,linux/arm64"), 2);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/multi:latest", true);

    let proxy = Proxy::for_registry(&registry);
    let raw = inspect_raw_via(&proxy, &registry.image("test/multi:latest"));
    assert_eq!(
        sha256_digest(&raw),
        index_digest,
        "index bytes served through the proxy differ"
    );
    let index: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        index["manifests"].as_array().map(Vec::len),
        Some(2),
        "index: {index}"
    );

    let dst = dir.join("dst");
    skopeo_copy_via(
        &proxy,
        &registry.image("test/multi:latest"),
        &oci_ref(&dst),
        true,
    );
    assert_eq!(oci_index_digest(&dst), index_digest);
    assert_same_image(&src, &dst);
}

/// A layer of 24 MiB from a real registry (which offers ranges) comes in ranged pieces, each
/// on a connection of its own, every byte once, and the image still pulls byte-identical; a second pull comes from
/// the cache.
#[test]
fn a_large_layer_comes_in_ranged_pieces() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 1, "24MiB", None, 3);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/large:latest", false);
    let layer = oci_layers(&src, &digest).remove(0);
    let size = oci_blobs(&src)[&layer];

    let proxy = Proxy::for_registry(&registry);
    for (n, dst) in ["a", "b"].iter().enumerate() {
        let dst = dir.join(dst);
        skopeo_copy_via(
            &proxy,
            &registry.image("test/large:latest"),
            &oci_ref(&dst),
            false,
        );
        assert_same_image(&src, &dst);
        let log = registry.access_log();
        let pieces = log
            .iter()
            .filter(|e| e.is_blob_get(&layer) && e.status == 206)
            .count();
        let whole = log
            .iter()
            .filter(|e| e.is_blob_get(&layer) && e.status == 200)
            .count();
        assert!(
            pieces >= 3,
            "pull {n}: {pieces} ranged GETs of the layer\n{log:#?}"
        );
        // Even the first request asks for a piece: a whole GET cut short would carry more.
        assert_eq!(whole, 0, "pull {n}: whole GETs of the layer\n{log:#?}");
        assert_eq!(registry.blob_bytes(&layer), size, "pull {n}: bytes carried");
    }
    let m = metrics(&proxy);
    assert!(sample(&m, "regproxy_upstream_pieces_total") >= 3, "{m}");
    assert_eq!(sample(&m, "regproxy_piece_fallbacks_total"), 0, "{m}");
}
