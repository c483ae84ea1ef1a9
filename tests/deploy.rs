//! The Kubernetes examples in deploy/kubernetes/ stay true: parsed with
//! PyYAML (in the test venv), the ConfigMap's credproxy.toml and
//! integrations pass `credproxy check-config`, the sidecar is a native
//! sidecar, probes hit the real endpoints, and the pods' termination grace
//! covers credproxy's drain.

mod support;

use serde_json::Value;
use support::*;

/// All documents of a manifest file, as JSON.
async fn manifests(file: &str) -> Vec<Value> {
    let script = "import json, sys, yaml\nprint(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let out = tokio::process::Command::new(python())
        .args(["-c", script])
        .arg(repo().join("deploy/kubernetes").join(file))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn check_probes_and_grace(pod: &Value, container: &Value, grace_secs: u64) {
    for (probe, path) in [("readinessProbe", "/readyz"), ("startupProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
    }
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap_or(0);
    let termination = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert!(termination > grace_secs + pre_stop, "{termination} s must cover the {grace_secs} s drain + {pre_stop} s");
    assert_eq!(container["args"], serde_json::json!(["serve", "--config", "/etc/credproxy/credproxy.toml"]));
}

#[tokio::test]
async fn kubernetes_examples_are_consistent_with_the_binary() {
    let config = manifests("config.yaml").await;
    let toml_text =
        find(&config, "ConfigMap", "credproxy-config")["data"]["credproxy.toml"].as_str().unwrap().to_owned();
    let ints = find(&config, "ConfigMap", "credproxy-integrations")["data"].as_object().unwrap().clone();

    // check-config with the ConfigMap laid out as the pods mount it.
    let dir = tempfile::tempdir().unwrap();
    let ints_dir = dir.path().join("integrations");
    std::fs::create_dir(&ints_dir).unwrap();
    for (name, text) in &ints {
        std::fs::write(ints_dir.join(name), text.as_str().unwrap()).unwrap();
    }
    let cfg_path = dir.path().join("credproxy.toml");
    std::fs::write(&cfg_path, &toml_text).unwrap();
    // The Secret credproxy-ca, as `credproxy ca init` makes it (check-config
    // reads the CA files the configuration names, as serve does).
    let certs = dir.path().join("certs");
    let out =
        tokio::process::Command::new(credproxy_bin()).args(["ca", "init", "--out"]).arg(&certs).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // What each layout sets in its environment.
    let sidecar_mode = [("CREDPROXY_PROXY__ORG_ID", "org_a")];
    let shared_mode = [
        ("CREDPROXY_PROXY__MODE", "shared"),
        ("CREDPROXY_RUN_TOKENS__SIGNING_KEY", "c2lnbmluZy1rZXktb2YtYXQtbGVhc3QtMzItYnl0ZXMh"),
    ];
    let check = |ca_dir: &std::path::Path, layout: &[(&str, &str)]| {
        let mut cmd = tokio::process::Command::new(credproxy_bin());
        cmd.args(["check-config", "--config"])
            .arg(&cfg_path)
            .envs(layout.iter().copied())
            .env("CREDPROXY_PLATFORM_TOKEN", "platform-token-0123456789")
            .env("CREDPROXY_DB_PASSWORD", "pw")
            .env("CREDPROXY_INTEGRATIONS__DIR", &ints_dir)
            .env("CREDPROXY_TLS_INTERCEPT__CA_CERT", ca_dir.join("credproxy-ca.pem"))
            .env("CREDPROXY_TLS_INTERCEPT__CA_KEY", ca_dir.join("credproxy-ca.key"));
        cmd
    };
    let out = check(&certs, &sidecar_mode).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Without the mounted CA, check-config says so (as serve would).
    let out = check(&dir.path().join("not-mounted"), &sidecar_mode).output().await.unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("environment CREDPROXY_TLS_INTERCEPT__CA_CERT"));
    let parsed: toml::Value = toml::from_str(&toml_text).unwrap();
    assert_eq!(parsed["integrations"]["dir"].as_str(), Some("/etc/credproxy/integrations"));
    // The configuration names the CA where the pods mount the Secret.
    assert_eq!(parsed["tls_intercept"]["ca_cert"].as_str(), Some("/etc/credproxy/certs/credproxy-ca.pem"));
    assert_eq!(parsed["tls_intercept"]["ca_key"].as_str(), Some("/etc/credproxy/certs/credproxy-ca.key"));
    let grace = parsed["shutdown"]["grace_secs"].as_integer().unwrap() as u64;

    // Native sidecar.
    let sidecar = manifests("sidecar/execution-pod.yaml").await;
    let pod = sidecar.iter().find(|d| d["kind"] == "Pod").expect("a Pod");
    let spec = &pod["spec"];
    let init = spec["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "credproxy").unwrap();
    assert_eq!(init["restartPolicy"], "Always", "native sidecar");
    check_probes_and_grace(spec, init, grace);
    let runner = &spec["containers"][0];
    let env: Vec<(String, String)> = runner["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e["value"].as_str().unwrap_or("").to_owned()))
        .collect();
    for name in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
        assert!(env.iter().any(|(k, v)| k == name && v == "http://127.0.0.1:8080"), "{name}");
    }

    let org = env.iter().find(|(k, _)| k == "CREDPROXY_PROXY__ORG_ID");
    let sidecar_env = init["env"].as_array().unwrap();
    assert!(org.is_none(), "the runner does not configure credproxy");
    assert!(sidecar_env.iter().any(|e| e["name"] == "CREDPROXY_PROXY__ORG_ID"), "the sidecar serves one organization");
    assert!(!sidecar_env.iter().any(|e| e["name"] == "CREDPROXY_PROXY__MODE"), "the sidecar stays in sidecar mode");

    // Shared tier: shared mode, every replica with the same signing key from the Secret.
    let shared = manifests("shared/deployment.yaml").await;
    let deploy = find(&shared, "Deployment", "credproxy");
    let spec = &deploy["spec"]["template"]["spec"];
    let shared_env = spec["containers"][0]["env"].as_array().unwrap();
    assert!(
        shared_env.iter().any(|e| e["name"] == "CREDPROXY_PROXY__MODE" && e["value"] == "shared"),
        "{shared_env:?}"
    );
    assert!(!shared_env.iter().any(|e| e["name"] == "CREDPROXY_PROXY__ORG_ID"), "{shared_env:?}");
    let key_ref = shared_env.iter().find(|e| e["name"] == "CREDPROXY_RUN_TOKENS__SIGNING_KEY").expect("a signing key");
    assert_eq!(key_ref["valueFrom"]["secretKeyRef"]["key"], "run-token-key");
    let out = check(&certs, &shared_mode).output().await.unwrap();
    assert!(out.status.success(), "shared mode: {}", String::from_utf8_lossy(&out.stderr));
    check_probes_and_grace(spec, &spec["containers"][0], grace);
    let mounts = spec["containers"][0]["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "ca" && m["mountPath"] == "/etc/credproxy/certs"), "{mounts:?}");
    let pdb = find(&shared, "PodDisruptionBudget", "credproxy");
    assert_eq!(pdb["spec"]["selector"], deploy["spec"]["selector"]);
    let svc = find(&shared, "Service", "credproxy");
    assert_eq!(svc["spec"]["selector"], deploy["spec"]["selector"]["matchLabels"]);

    // The Ingress exposes the public listener only: its Service's port is
    // the container's public port, which the configuration listens on, and
    // base_url is the Ingress's host.
    assert_eq!(parsed["public"]["listen"].as_str(), Some("0.0.0.0:8082"));
    let ports = spec["containers"][0]["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| p["name"] == "public" && p["containerPort"] == 8082), "{ports:?}");
    let ingress = find(&shared, "Ingress", "credproxy-connect");
    let host = ingress["spec"]["rules"][0]["host"].as_str().unwrap();
    assert_eq!(parsed["public"]["base_url"].as_str(), Some(format!("https://{host}").as_str()));
    for path in ingress["spec"]["rules"][0]["http"]["paths"].as_array().unwrap() {
        assert_eq!(path["backend"]["service"]["name"], "credproxy-public", "{path}");
    }
    let public_svc = find(&shared, "Service", "credproxy-public");
    assert_eq!(public_svc["spec"]["ports"][0]["targetPort"], "public");
}
