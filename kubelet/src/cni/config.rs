//! Loading the network configuration from `--cni-conf-dir`.
//!
//! Ref: CNI SPEC.md 1.0.0, "Section 1: Network configuration format", and libcni's `ConfFiles`/`LoadConfList`:
//! the runtime takes the lexically first file ending in `.conflist`, `.conf` or `.json`; a single-plugin `.conf`
//! is wrapped into a list of one.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::CniError;

/// One network: the list of plugins that ADD runs in order and DEL runs in reverse.
#[derive(Debug, Clone)]
pub struct NetworkConfigList {
    /// The network's `name` (also part of the result cache key).
    pub name: String,
    /// The `cniVersion` every plugin is called with.
    pub cni_version: String,
    /// `disableCheck`: CHECK is skipped (and succeeds) when true.
    pub disable_check: bool,
    /// The plugins in order, each its raw JSON object.
    pub plugins: Vec<PluginConfig>,
    /// The file it came from, for error messages.
    pub source: PathBuf,
    /// The whole list as loaded, kept in the cache like libcni does.
    pub raw: Value,
}

/// One plugin's configuration inside a list.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// `type`: the plugin's binary name.
    pub plugin_type: String,
    /// The plugin's own object as written in the file.
    pub raw: Map<String, Value>,
}

impl NetworkConfigList {
    /// The `lo` network every sandbox also gets (containerd/go-cni's loopback network, upstream's `cni-loopback`):
    /// the reference `loopback` plugin, called with interface `lo`.
    pub fn loopback(cni_version: &str) -> Self {
        let raw = serde_json::json!({
            "cniVersion": cni_version,
            "name": "cni-loopback",
            "plugins": [{"type": "loopback"}],
        });
        let mut map = Map::new();
        map.insert("type".into(), Value::String("loopback".into()));
        Self {
            name: "cni-loopback".into(),
            cni_version: cni_version.into(),
            disable_check: false,
            plugins: vec![PluginConfig {
                plugin_type: "loopback".into(),
                raw: map,
            }],
            source: PathBuf::from("<built-in loopback>"),
            raw,
        }
    }
}

impl PluginConfig {
    /// Whether the plugin declares `capabilities.<name>: true` (only then may it receive `runtimeConfig.<name>`).
    pub fn has_capability(&self, name: &str) -> bool {
        self.raw
            .get("capabilities")
            .and_then(|c| c.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// Versions that support CHECK (the spec added it in 0.4.0).
pub(crate) fn version_supports_check(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    major >= 1 || minor >= 4
}

/// Loads the lexically first `.conflist`/`.conf`/`.json` file in `dir`.
pub fn load_first(dir: &Path) -> Result<NetworkConfigList, CniError> {
    let entries = std::fs::read_dir(dir).map_err(|source| CniError::ReadConfig {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    let first = files.into_iter().next().ok_or_else(|| CniError::NoConfig {
        dir: dir.to_path_buf(),
    })?;
    load_file(&first)
}

/// Loads one configuration file: a `.conflist`, or a single plugin `.conf`/`.json`.
pub fn load_file(path: &Path) -> Result<NetworkConfigList, CniError> {
    let bytes = std::fs::read(path).map_err(|source| CniError::ReadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| CniError::InvalidConfig {
        path: path.to_path_buf(),
        reason: format!("not JSON: {e}"),
    })?;
    parse(value, path)
}

/// Parses a configuration (list or single plugin) already read as JSON.
pub fn parse(value: Value, path: &Path) -> Result<NetworkConfigList, CniError> {
    let invalid = |reason: String| CniError::InvalidConfig {
        path: path.to_path_buf(),
        reason,
    };
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("not a JSON object".into()))?;
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("missing \"name\"".into()))?
        .to_string();
    let cni_version = obj
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("missing \"cniVersion\"".into()))?
        .to_string();
    // A list has "plugins"; a single plugin file has "type" and is wrapped (libcni ConfListFromConf).
    let (plugin_values, raw) = match obj.get("plugins") {
        Some(Value::Array(list)) => (list.clone(), value.clone()),
        Some(_) => return Err(invalid("\"plugins\" is not an array".into())),
        None => {
            let raw = serde_json::json!({
                "cniVersion": cni_version,
                "name": name,
                "plugins": [value.clone()],
            });
            (vec![value.clone()], raw)
        }
    };
    if plugin_values.is_empty() {
        return Err(invalid("\"plugins\" is empty".into()));
    }
    let mut plugins = Vec::with_capacity(plugin_values.len());
    for (i, p) in plugin_values.into_iter().enumerate() {
        let Value::Object(map) = p else {
            return Err(invalid(format!("plugin {i} is not an object")));
        };
        let plugin_type = map
            .get("type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid(format!("plugin {i} has no \"type\"")))?
            .to_string();
        // The type names a file in CNI_PATH; a path would let a config run anything (libcni FindInPath refuses it).
        if plugin_type.contains('/') || plugin_type == ".." || plugin_type == "." {
            return Err(invalid(format!(
                "plugin type {plugin_type:?} is not a plain name"
            )));
        }
        plugins.push(PluginConfig {
            plugin_type,
            raw: map,
        });
    }
    Ok(NetworkConfigList {
        name,
        cni_version,
        disable_check: obj
            .get("disableCheck")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        plugins,
        source: path.to_path_buf(),
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lexically_first_config_file_is_chosen_and_others_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("20-b.conflist"),
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("10-a.conf"),
            r#"{"cniVersion":"1.0.0","name":"a","type":"ptp"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("00-readme.txt"), "not a config").unwrap();
        let list = load_first(dir.path()).unwrap();
        assert_eq!(list.name, "a");
        assert_eq!(list.plugins.len(), 1);
        assert_eq!(list.plugins[0].plugin_type, "ptp");
        assert_eq!(list.raw["plugins"][0]["type"], "ptp");
    }

    #[test]
    fn an_empty_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_first(dir.path()).unwrap_err();
        assert!(matches!(err, CniError::NoConfig { .. }), "{err}");
    }

    #[test]
    fn a_plugin_type_with_a_slash_is_refused() {
        let v = serde_json::json!({"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../../bin/sh"}]});
        let err = parse(v, Path::new("x.conflist")).unwrap_err();
        assert!(err.to_string().contains("not a plain name"), "{err}");
    }

    #[test]
    fn broken_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-x.conflist");
        std::fs::write(&path, "{ nope").unwrap();
        let err = load_first(dir.path()).unwrap_err();
        assert!(err.to_string().contains("10-x.conflist"), "{err}");
    }

    #[test]
    fn check_is_only_for_versions_from_0_4_0() {
        assert!(version_supports_check("1.0.0"));
        assert!(version_supports_check("0.4.0"));
        assert!(!version_supports_check("0.3.1"));
    }
}
