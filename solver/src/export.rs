//! The result of a build as an image: the base image's layers and history,
//! the layers the build added, and the OCI config the plan computed, stored
//! under the `-t` names.

use std::collections::HashMap;

use kiln_cache::{Digest, Image, Reference, Store, StoreError};
use serde_json::{Map, Value, json};

use crate::graph::{BuildGraph, Edge, HealthConfig, ImageConfig, Op, StageBase, VertexId};
use crate::runner::Chain;

/// Why the image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The target stage has no result.
    #[error("the target stage has no result")]
    NoResult,
    /// A `-t` name is not a valid reference.
    #[error("invalid tag `{name}`")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: Box<StoreError>,
    },
    /// The store failed.
    #[error("storing the image")]
    Store(#[source] Box<StoreError>),
    /// The config did not serialize.
    #[error("serializing the image config")]
    Json(#[source] serde_json::Error),
}

/// What to put in the image besides the plan.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// `-t` names.
    pub names: Vec<String>,
    /// `--label`s, on top of the Dockerfile's.
    pub labels: Vec<(String, String)>,
    /// `SOURCE_DATE_EPOCH`: the config's and history's `created`.
    pub source_date_epoch: Option<i64>,
}

/// The planner's view of a stored image config (the raw JSON, so that the
/// Docker extensions `Healthcheck`, `Shell` and `OnBuild` are kept).
pub fn plan_config_json(config_json: &[u8]) -> ImageConfig {
    let v: Value = serde_json::from_slice(config_json).unwrap_or(Value::Null);
    let c = &v["config"];
    let strings = |x: &Value| -> Option<Vec<String>> {
        x.as_array().map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
    };
    let keys = |x: &Value| -> Vec<String> {
        x.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let dur = |x: &Value| x.as_u64().unwrap_or(0);
    ImageConfig {
        env: strings(&c["Env"]).unwrap_or_default(),
        cmd: strings(&c["Cmd"]),
        entrypoint: strings(&c["Entrypoint"]),
        working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_owned(),
        user: c["User"].as_str().unwrap_or_default().to_owned(),
        labels: c["Labels"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
        exposed_ports: keys(&c["ExposedPorts"]).into_iter().collect(),
        volumes: keys(&c["Volumes"]).into_iter().collect(),
        stop_signal: c["StopSignal"].as_str().map(str::to_owned),
        healthcheck: c["Healthcheck"].as_object().map(|h| HealthConfig {
            test: strings(&h.get("Test").cloned().unwrap_or(Value::Null)).unwrap_or_default(),
            interval_ns: dur(h.get("Interval").unwrap_or(&Value::Null)),
            timeout_ns: dur(h.get("Timeout").unwrap_or(&Value::Null)),
            start_period_ns: dur(h.get("StartPeriod").unwrap_or(&Value::Null)),
            start_interval_ns: dur(h.get("StartInterval").unwrap_or(&Value::Null)),
            retries: h
                .get("Retries")
                .and_then(Value::as_u64)
                .and_then(|r| u32::try_from(r).ok())
                .unwrap_or(0),
        }),
        shell: strings(&c["Shell"]),
        on_build: strings(&c["OnBuild"]).unwrap_or_default(),
    }
}

/// The OCI `config` object of `c`.
pub fn oci_config(c: &ImageConfig) -> Value {
    let mut m = Map::new();
    let set = |m: &mut Map<String, Value>, k: &str, v: Value| {
        m.insert(k.to_owned(), v);
    };
    if !c.user.is_empty() {
        set(&mut m, "User", json!(c.user));
    }
    if !c.exposed_ports.is_empty() {
        let ports: Map<String, Value> = c
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), json!({})))
            .collect();
        set(&mut m, "ExposedPorts", Value::Object(ports));
    }
    if !c.env.is_empty() {
        set(&mut m, "Env", json!(c.env));
    }
    if let Some(e) = &c.entrypoint {
        set(&mut m, "Entrypoint", json!(e));
    }
    if let Some(cmd) = &c.cmd {
        set(&mut m, "Cmd", json!(cmd));
    }
    if !c.volumes.is_empty() {
        let v: Map<String, Value> = c.volumes.iter().map(|p| (p.clone(), json!({}))).collect();
        set(&mut m, "Volumes", Value::Object(v));
    }
    if !c.working_dir.is_empty() {
        set(&mut m, "WorkingDir", json!(c.working_dir));
    }
    if !c.labels.is_empty() {
        set(&mut m, "Labels", json!(c.labels));
    }
    if let Some(s) = &c.stop_signal {
        set(&mut m, "StopSignal", json!(s));
    }
    if let Some(h) = &c.healthcheck {
        let mut hc = Map::new();
        hc.insert("Test".into(), json!(h.test));
        for (k, v) in [
            ("Interval", h.interval_ns),
            ("Timeout", h.timeout_ns),
            ("StartPeriod", h.start_period_ns),
            ("StartInterval", h.start_interval_ns),
        ] {
            if v != 0 {
                hc.insert(k.into(), json!(v));
            }
        }
        if h.retries != 0 {
            hc.insert("Retries".into(), json!(h.retries));
        }
        set(&mut m, "Healthcheck", Value::Object(hc));
    }
    if let Some(s) = &c.shell {
        set(&mut m, "Shell", json!(s));
    }
    if !c.on_build.is_empty() {
        set(&mut m, "OnBuild", json!(c.on_build));
    }
    Value::Object(m)
}

/// The history entries a stage (and the stages it is built on) adds, with
/// `empty_layer` from whether each step really added a layer; the base
/// image's history comes first.
fn history(
    store: &Store,
    graph: &BuildGraph,
    outputs: &HashMap<VertexId, Chain>,
    stage_index: usize,
    created: &str,
    out: &mut Vec<Value>,
) {
    let Some(stage) = graph.stage(stage_index) else {
        return;
    };
    match &stage.base {
        StageBase::Stage { index } if *index != stage_index => {
            history(store, graph, outputs, *index, created, out);
        }
        StageBase::Image { reference } => {
            if let Ok(img) = store.resolve(reference) {
                let v: Value = serde_json::from_slice(&img.config_bytes).unwrap_or(Value::Null);
                if let Some(h) = v["history"].as_array() {
                    out.extend(h.iter().cloned());
                }
            }
        }
        _ => {}
    }
    let len = |v: VertexId| outputs.get(&v).map_or(0, |c| c.layers.len());
    for v in graph.topo_order() {
        let vert = &graph.graph[v];
        if vert.stage != Some(stage_index) || matches!(vert.op, Op::Source(_) | Op::StageRef { .. })
        {
            continue;
        }
        let Some(h) = &vert.history else { continue };
        let parent = graph
            .inputs(v)
            .into_iter()
            .find(|(_, e)| *e == Edge::Parent)
            .map(|(p, _)| p);
        let empty = parent.is_some_and(|p| len(p) == len(v)) || parent.is_none();
        let mut e = Map::new();
        e.insert("created".into(), json!(created));
        e.insert("created_by".into(), json!(h.created_by));
        e.insert("comment".into(), json!("buildkit.dockerfile.v0"));
        if empty {
            e.insert("empty_layer".into(), json!(true));
        }
        out.push(Value::Object(e));
    }
}

/// Make and store the image of the target stage. Returns the stored image.
pub fn export_image(
    store: &Store,
    graph: &BuildGraph,
    outputs: &HashMap<VertexId, Chain>,
    opts: &ExportOptions,
) -> Result<Image, ExportError> {
    let target = graph.target_stage().ok_or(ExportError::NoResult)?;
    let chain = outputs.get(&target.last).ok_or(ExportError::NoResult)?;
    let names = opts
        .names
        .iter()
        .map(|n| {
            Reference::parse(n).map_err(|source| ExportError::BadName {
                name: n.clone(),
                source: Box::new(source),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = target.config.clone();
    for (k, v) in &opts.labels {
        config.labels.insert(k.clone(), v.clone());
    }
    let config_doc = |created: &str| -> Result<Vec<u8>, ExportError> {
        let mut hist = Vec::new();
        history(store, graph, outputs, target.index, created, &mut hist);
        image_config(target, &config, chain, created, hist)
    };
    // The same image as last time gets the same config (and id), as a
    // fully cached rebuild does in BuildKit: remember the config made for
    // everything but the time, and reuse it while its blob is here.
    let remembered = format!(
        "export:{}:{}",
        Digest::of_bytes(&config_doc("")?),
        opts.source_date_epoch
            .map_or_else(String::new, |e| e.to_string())
    );
    if let Ok(Some(rec)) = store.get_cache_record(&remembered)
        && let Some(id) = &rec.config
        && let Ok(bytes) = store.read_blob(id)
    {
        return store
            .put_image(&names, &bytes, &chain.layer_infos())
            .map_err(|e| ExportError::Store(Box::new(e)));
    }
    let t = opts.source_date_epoch.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
    });
    let bytes = config_doc(&kiln_cache::format_rfc3339(t))?;
    let image = store
        .put_image(&names, &bytes, &chain.layer_infos())
        .map_err(|e| ExportError::Store(Box::new(e)))?;
    let rec = kiln_cache::CacheResult {
        diff_ids: chain.layers.iter().map(|l| l.diff_id.clone()).collect(),
        config: Some(image.id.clone()),
        extra: Value::Null,
    };
    store
        .put_cache_record(&remembered, &rec)
        .map_err(|e| ExportError::Store(Box::new(e)))?;
    Ok(image)
}

/// The image config document.
fn image_config(
    target: &crate::graph::StagePlan,
    config: &ImageConfig,
    chain: &Chain,
    created: &str,
    hist: Vec<Value>,
) -> Result<Vec<u8>, ExportError> {
    let mut doc = Map::new();
    doc.insert("architecture".into(), json!(target.platform.architecture));
    doc.insert("os".into(), json!(target.platform.os));
    if !target.platform.variant.is_empty() {
        doc.insert("variant".into(), json!(target.platform.variant));
    }
    doc.insert("created".into(), json!(created));
    doc.insert("config".into(), oci_config(config));
    doc.insert(
        "rootfs".into(),
        json!({
            "type": "layers",
            "diff_ids": chain.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
        }),
    );
    doc.insert("history".into(), Value::Array(hist));
    serde_json::to_vec(&Value::Object(doc)).map_err(ExportError::Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_config() -> ImageConfig {
        let mut c = ImageConfig {
            env: vec!["PATH=/bin".into(), "A=1".into()],
            cmd: Some(vec!["sh".into()]),
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            working_dir: "/app".into(),
            user: "nobody".into(),
            stop_signal: Some("SIGTERM".into()),
            healthcheck: Some(HealthConfig {
                test: vec!["CMD-SHELL".into(), "true".into()],
                interval_ns: 30_000_000_000,
                timeout_ns: 0,
                start_period_ns: 5,
                start_interval_ns: 0,
                retries: 3,
            }),
            shell: Some(vec!["/bin/bash".into(), "-c".into()]),
            on_build: vec!["RUN true".into()],
            ..ImageConfig::default()
        };
        c.labels.insert("a".into(), "b".into());
        c.exposed_ports.insert("80/tcp".into());
        c.volumes.insert("/data".into());
        c
    }

    #[test]
    fn config_round_trips_through_oci_json() {
        let c = full_config();
        let doc = json!({ "config": oci_config(&c) });
        let bytes = serde_json::to_vec(&doc).unwrap_or_default();
        assert_eq!(plan_config_json(&bytes), c);
    }

    #[test]
    fn oci_config_uses_docker_field_names_and_omits_empty_fields() {
        let v = oci_config(&full_config());
        assert_eq!(v["ExposedPorts"], json!({"80/tcp": {}}));
        assert_eq!(v["Volumes"], json!({"/data": {}}));
        assert_eq!(v["Healthcheck"]["Interval"], json!(30_000_000_000u64));
        assert!(v["Healthcheck"].get("Timeout").is_none());
        let empty = oci_config(&ImageConfig::default());
        assert_eq!(empty, json!({}));
    }

    #[test]
    fn plan_config_of_garbage_is_empty() {
        assert_eq!(plan_config_json(b"not json"), ImageConfig::default());
        assert_eq!(
            plan_config_json(br#"{"config":{"Env":"notalist","Cmd":[1,"x"]}}"#),
            ImageConfig {
                cmd: Some(vec!["x".into()]),
                ..ImageConfig::default()
            }
        );
    }
}
