//! `mooring ota ...`: over-the-air updates (issue 17): artifacts (upload: chunked, resumable,
//! signed by the server or with an offline key; list, show, delete), `keygen` for the offline
//! update key, and deployments (deploy, status, cancel, a device's history).

use super::{call, usage, ApiArgs, EXIT_OK};
use crate::output::{print_fields, print_json, rfc3339, OutputArgs, Table};
use anyhow::Context;
use clap::Subcommand;
use mooring_api::{Artifact, CompleteArtifact, CreateArtifact};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

/// Default chunk of an upload (the server takes at most 8 MiB).
const CHUNK_BYTES_DEFAULT: usize = 4 * 1024 * 1024;

#[derive(Subcommand)]
pub enum OtaCommand {
    /// Upload an artifact: stores the file in chunks with its SHA-256 and size, and signs its
    /// manifest (with --sign-key here, else the server's update key). Run it again with the
    /// same file and version to resume an interrupted upload. Prints the artifact id.
    Upload {
        /// The file (the image a device writes to its inactive slot).
        file: PathBuf,
        /// What a device runs after installing it, e.g. 1.4.0 (unique among artifacts).
        #[arg(long)]
        version: String,
        /// Hardware revisions it runs on, comma-separated (e.g. rev-b,rev-c).
        #[arg(
            long,
            value_delimiter = ',',
            required = true,
            value_name = "REV[,REV...]"
        )]
        compatible: Vec<String>,
        /// Release notes for people.
        #[arg(long)]
        notes: Option<String>,
        /// The update key's private half (from `mooring ota keygen`): sign the manifest here;
        /// needed when the server has `[ota] update_public_key` (the key is kept offline).
        #[arg(long, value_name = "FILE")]
        sign_key: Option<PathBuf>,
        /// Bytes per chunk (at most 8 MiB).
        #[arg(long, default_value_t = CHUNK_BYTES_DEFAULT, value_name = "BYTES")]
        chunk_bytes: usize,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List artifacts.
    List {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show one artifact, with its manifest and signature.
    Show {
        /// Artifact id (`art_...`, from `ota list`).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Delete an artifact and its bytes (refused while a deployment uses it), or a deployment
    /// that is over (canceled, or every device's update final) with its devices' updates.
    Delete {
        /// Artifact id (`art_...`) or deployment id (`dep_...`).
        id: String,
    },
    /// Deploy a ready artifact to the devices a selector matches: one update command each
    /// (devices report every step; `ota status` counts them). Prints the deployment id.
    Deploy {
        /// Artifact id (`art_...`).
        #[arg(long)]
        artifact: String,
        /// Which devices: a selector such as tag:site=berlin, id:d1,d2 or all.
        #[arg(long = "to", value_name = "SELECTOR")]
        to: String,
        /// Devices install it even when it is older than what they run.
        #[arg(long)]
        allow_downgrade: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List deployments, newest first, with their devices per update state.
    Deployments {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// A deployment's devices per update state.
    Status {
        /// Deployment id (`dep_...`).
        id: String,
        /// Keep showing the counts (every second, on stderr) until every device's update is
        /// final or the deployment is canceled.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Cancel a deployment: updates not picked up yet are withdrawn; devices that started are
    /// asked to stop (one that is installing finishes and reports what happened).
    Cancel {
        /// Deployment id (`dep_...`).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// A device's updates, newest first.
    History {
        /// Device id.
        device: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Create an update key to keep offline: writes the private key to FILE (0600, never
    /// overwritten) and prints the public key for the server's `[ota] update_public_key` and
    /// the agents' config.
    Keygen {
        /// Where to write the private key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn print_artifact(a: &Artifact, output: &OutputArgs) -> anyhow::Result<()> {
    if output.json() {
        return print_json(a);
    }
    print_fields(&[
        ("id", a.id.clone()),
        ("version", a.version.clone()),
        ("state", a.state.clone()),
        ("size", a.size.to_string()),
        ("stored", a.stored_bytes.to_string()),
        ("sha256", a.sha256.clone()),
        ("compatible", a.compatible.join(",")),
        ("notes", a.notes.clone().unwrap_or_else(|| "-".into())),
        ("created", rfc3339(a.created_at)),
        ("created by", a.created_by.clone()),
        ("manifest", a.manifest.clone()),
        (
            "signature",
            a.signature.clone().unwrap_or_else(|| "-".into()),
        ),
    ]);
    Ok(())
}

fn print_deployment(d: &mooring_api::Deployment, output: &OutputArgs) -> anyhow::Result<()> {
    if output.json() {
        return print_json(d);
    }
    let mut fields = vec![
        ("id", d.id.clone()),
        (
            "artifact",
            format!("{} (version {})", d.artifact_id, d.version),
        ),
        ("selector", d.selector.clone()),
        ("devices", d.total.to_string()),
        ("created", rfc3339(d.created_at)),
        (
            "canceled",
            d.canceled_at.map_or_else(|| "-".to_owned(), rfc3339),
        ),
    ];
    for state in mooring_proto::ota::UpdateState::ALL {
        if let Some(n) = d.counts.get(state.as_str()) {
            fields.push((state.as_str(), n.to_string()));
        }
    }
    print_fields(&fields);
    Ok(())
}

/// How often `ota status --watch` asks.
const WATCH_INTERVAL_MS: u64 = 1000;

/// Whether every device's update is over (committed, rolled back or failed).
fn all_final(d: &mooring_api::Deployment) -> bool {
    let done: u64 = mooring_proto::ota::UpdateState::ALL
        .into_iter()
        .filter(|s| s.is_final())
        .filter_map(|s| d.counts.get(s.as_str()))
        .sum();
    done == d.total
}

/// `pending 3, downloading 2, committed 5 (of 10)`, in pipeline order.
fn counts_line(d: &mooring_api::Deployment) -> String {
    let parts: Vec<String> = mooring_proto::ota::UpdateState::ALL
        .into_iter()
        .filter_map(|s| {
            d.counts
                .get(s.as_str())
                .map(|n| format!("{} {n}", s.as_str()))
        })
        .collect();
    format!("{} (of {})", parts.join(", "), d.total)
}

fn mib(n: u64) -> String {
    format!("{:.1}", n as f64 / (1024.0 * 1024.0))
}

pub async fn ota(args: ApiArgs, command: OtaCommand) -> anyhow::Result<u8> {
    match command {
        OtaCommand::Keygen { out } => {
            use std::os::unix::fs::OpenOptionsExt;
            let (seed, public) = mooring_server::ota::generate_key()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {} (never overwritten)", out.display()))?;
            f.write_all(format!("{seed}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{public}");
            eprintln!(
                "private key written to {} (keep it offline); put the public key above in the server's [ota] update_public_key and the agents' config",
                out.display()
            );
        }
        OtaCommand::Upload {
            file,
            version,
            compatible,
            notes,
            sign_key,
            chunk_bytes,
            output,
        } => {
            if chunk_bytes == 0 || chunk_bytes > mooring_server::ota::CHUNK_SIZE_BYTES_MAX {
                return usage(format!(
                    "--chunk-bytes must be between 1 and {}",
                    mooring_server::ota::CHUNK_SIZE_BYTES_MAX
                ));
            }
            // The key first: a bad key file fails before anything is uploaded.
            let key = match &sign_key {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading --sign-key {}", path.display()))?;
                    Some(
                        mooring_server::ota::key_from_seed_hex(&text)
                            .with_context(|| format!("--sign-key {}", path.display()))?,
                    )
                }
                None => None,
            };
            let (sha256, size) = mooring_server::ota::sha256_file(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let (file_sha256, file_size) = (sha256.clone(), size);
            let (want_version, want_compatible) = (version.clone(), compatible.clone());
            let client = args.connect()?;
            let existing = call(client.list_all_artifacts().await)?
                .into_iter()
                .find(|a| a.version == version);
            let mut art = match existing {
                Some(a) if a.sha256 == sha256 && a.state == "ready" => {
                    eprintln!("{} is uploaded already as {}", file.display(), a.id);
                    print_artifact(&a, &output)?;
                    return Ok(EXIT_OK);
                }
                Some(a) if a.sha256 == sha256 => {
                    eprintln!(
                        "resuming the upload of {} at byte {} of {}",
                        a.id, a.stored_bytes, a.size
                    );
                    a
                }
                Some(a) => {
                    anyhow::bail!(
                        "version {version} is artifact {} with another file (sha256 {}); delete it first (mooring ota delete {})",
                        a.id,
                        a.sha256,
                        a.id
                    )
                }
                None => call(
                    client
                        .create_artifact(&CreateArtifact {
                            version,
                            compatible,
                            notes,
                            sha256,
                            size,
                        })
                        .await,
                )?,
            };
            let mut f = std::fs::File::open(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut buf = vec![0u8; chunk_bytes];
            while art.stored_bytes < art.size {
                let at = art.stored_bytes;
                f.seek(SeekFrom::Start(at))
                    .with_context(|| format!("reading {}", file.display()))?;
                let want = usize::try_from(art.size - at)
                    .unwrap_or(usize::MAX)
                    .min(chunk_bytes);
                f.read_exact(&mut buf[..want]).with_context(|| {
                    format!(
                        "reading {} (did it change during the upload?)",
                        file.display()
                    )
                })?;
                art = call(
                    client
                        .put_artifact_content(&art.id, at, buf[..want].to_vec())
                        .await,
                )?;
                eprint!(
                    "\ruploading {}: {}/{} MiB ({}%)",
                    art.id,
                    mib(art.stored_bytes),
                    mib(art.size),
                    art.stored_bytes * 100 / art.size.max(1)
                );
            }
            eprintln!();
            // An offline key signs only a manifest that says what this file is: a server that
            // was tampered with must not get another image signed (its sha256, size, version,
            // hardware or id would differ).
            let signature = match key.as_ref() {
                Some(k) => {
                    check_manifest(
                        &art,
                        &file_sha256,
                        file_size,
                        &want_version,
                        &want_compatible,
                    )?;
                    Some(mooring_server::ota::sign_manifest(
                        k,
                        art.manifest.as_bytes(),
                    ))
                }
                None => None,
            };
            let done = call(
                client
                    .complete_artifact(&art.id, &CompleteArtifact { signature })
                    .await,
            )?;
            if output.json() {
                print_json(&done)?;
            } else {
                println!("{}", done.id);
                eprintln!(
                    "artifact {} version {} ready ({} bytes, signed)",
                    done.id, done.version, done.size
                );
            }
        }
        OtaCommand::List { output } => {
            let all = call(args.connect()?.list_all_artifacts().await)?;
            if output.json() {
                print_json(&all)?;
            } else {
                let mut t =
                    Table::new(&["ID", "VERSION", "STATE", "SIZE", "COMPATIBLE", "CREATED"]);
                for a in &all {
                    t.row(vec![
                        a.id.clone(),
                        a.version.clone(),
                        a.state.clone(),
                        a.size.to_string(),
                        a.compatible.join(","),
                        rfc3339(a.created_at),
                    ]);
                }
                t.print();
            }
        }
        OtaCommand::Show { id, output } => {
            let a = call(args.connect()?.get_artifact(&id).await)?;
            print_artifact(&a, &output)?;
        }
        OtaCommand::Deploy {
            artifact,
            to,
            allow_downgrade,
            output,
        } => {
            let d = call(
                args.connect()?
                    .create_deployment(&mooring_api::CreateDeployment {
                        artifact_id: artifact,
                        selector: to,
                        allow_downgrade,
                    })
                    .await,
            )?;
            if output.json() {
                print_json(&d)?;
            } else {
                println!("{}", d.id);
                eprintln!(
                    "deployment {}: version {} to {} device{}",
                    d.id,
                    d.version,
                    d.total,
                    if d.total == 1 { "" } else { "s" }
                );
            }
        }
        OtaCommand::Deployments { output } => {
            let all = call(args.connect()?.list_all_deployments().await)?;
            if output.json() {
                print_json(&all)?;
            } else {
                let mut t = Table::new(&["ID", "VERSION", "SELECTOR", "STATES", "CREATED"]);
                for d in &all {
                    let mut states = counts_line(d);
                    if d.canceled_at.is_some() {
                        states.push_str(", canceled");
                    }
                    t.row(vec![
                        d.id.clone(),
                        d.version.clone(),
                        d.selector.clone(),
                        states,
                        rfc3339(d.created_at),
                    ]);
                }
                t.print();
            }
        }
        OtaCommand::Status { id, watch, output } => {
            let client = args.connect()?;
            let mut d = call(client.get_deployment(&id).await)?;
            while watch && d.canceled_at.is_none() && !all_final(&d) {
                eprint!("\r{}", counts_line(&d));
                tokio::time::sleep(std::time::Duration::from_millis(WATCH_INTERVAL_MS)).await;
                d = call(client.get_deployment(&id).await)?;
            }
            if watch {
                eprintln!("\r{}", counts_line(&d));
            }
            print_deployment(&d, &output)?;
        }
        OtaCommand::Cancel { id, output } => {
            let d = call(args.connect()?.cancel_deployment(&id).await)?;
            print_deployment(&d, &output)?;
        }
        OtaCommand::History { device, output } => {
            let h = call(args.connect()?.device_updates(&device).await)?;
            if output.json() {
                print_json(&h)?;
            } else {
                let mut t = Table::new(&[
                    "DEPLOYMENT",
                    "VERSION",
                    "STATE",
                    "REASON",
                    "RUNNING",
                    "UPDATED",
                ]);
                for u in &h.updates {
                    t.row(vec![
                        u.deployment_id.clone(),
                        u.version.clone(),
                        match u.progress_pct {
                            Some(p) if u.state == "downloading" => format!("downloading {p}%"),
                            _ => u.state.clone(),
                        },
                        u.reason.clone().unwrap_or_else(|| "-".into()),
                        u.running_version.clone().unwrap_or_else(|| "-".into()),
                        rfc3339(u.updated_at),
                    ]);
                }
                t.print();
            }
        }
        OtaCommand::Delete { id } => {
            if id.starts_with("dep_") {
                call(args.connect()?.delete_deployment(&id).await)?;
                eprintln!("deployment {id} deleted");
            } else {
                call(args.connect()?.delete_artifact(&id).await)?;
                eprintln!("artifact {id} deleted");
            }
        }
    }
    Ok(EXIT_OK)
}

/// Refuses to sign a manifest that does not describe the file being uploaded as asked (what a
/// tampered server could try with a user's offline key).
fn check_manifest(
    art: &mooring_api::Artifact,
    sha256: &str,
    size: u64,
    version: &str,
    compatible: &[String],
) -> anyhow::Result<()> {
    let m = mooring_proto::ota::Manifest::parse(art.manifest.as_bytes())
        .map_err(|e| anyhow::anyhow!("the server's manifest for {}: {e}; not signed", art.id))?;
    let mut wrong = Vec::new();
    if m.artifact_id != art.id {
        wrong.push(format!("artifact_id {} (not {})", m.artifact_id, art.id));
    }
    if m.sha256 != sha256 {
        wrong.push(format!("sha256 {} (the file's is {sha256})", m.sha256));
    }
    if m.size != size {
        wrong.push(format!("size {} (the file's is {size})", m.size));
    }
    if m.version != version {
        wrong.push(format!("version {} (not {version})", m.version));
    }
    if m.compatible != compatible {
        wrong.push(format!(
            "compatible {} (not {})",
            m.compatible.join(","),
            compatible.join(",")
        ));
    }
    anyhow::ensure!(
        wrong.is_empty(),
        "the server's manifest for {} does not describe this upload, so it was not signed: {}",
        art.id,
        wrong.join("; ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(m: &mooring_proto::ota::Manifest) -> mooring_api::Artifact {
        mooring_api::Artifact {
            id: m.artifact_id.clone(),
            version: m.version.clone(),
            sha256: m.sha256.clone(),
            size: m.size,
            compatible: m.compatible.clone(),
            notes: None,
            state: "uploading".into(),
            stored_bytes: m.size,
            manifest: String::from_utf8(m.to_bytes()).expect("utf8"),
            signature: None,
            created_at: 1,
            created_by: "usr_1".into(),
        }
    }

    #[test]
    fn an_offline_key_signs_only_a_manifest_of_the_file_being_uploaded() {
        let good = mooring_proto::ota::Manifest {
            v: 1,
            artifact_id: "art_0123456789abcdef".into(),
            version: "1.4.0".into(),
            sha256: "ab".repeat(32),
            size: 10,
            compatible: vec!["rev-b".into()],
            created_at: 1,
        };
        let rev_b = vec!["rev-b".to_owned()];
        let sha = "ab".repeat(32);
        check_manifest(&artifact(&good), &sha, 10, "1.4.0", &rev_b).expect("ours");
        // What a tampered server could hand out instead: each is refused, and says why.
        for (m, why) in [
            (
                mooring_proto::ota::Manifest {
                    sha256: "cd".repeat(32),
                    ..good.clone()
                },
                "sha256",
            ),
            (
                mooring_proto::ota::Manifest {
                    size: 11,
                    ..good.clone()
                },
                "size",
            ),
            (
                mooring_proto::ota::Manifest {
                    version: "9.9.9".into(),
                    ..good.clone()
                },
                "version",
            ),
            (
                mooring_proto::ota::Manifest {
                    compatible: vec!["rev-b".into(), "rev-z".into()],
                    ..good.clone()
                },
                "compatible",
            ),
        ] {
            let err = check_manifest(&artifact(&m), &sha, 10, "1.4.0", &rev_b).expect_err(why);
            assert!(err.to_string().contains(why), "{err:#}");
        }
        let mut other_id = artifact(&good);
        other_id.id = "art_ffffffffffffffff".into();
        assert!(check_manifest(&other_id, &sha, 10, "1.4.0", &rev_b).is_err());
        let mut garbage = artifact(&good);
        garbage.manifest = "{}".into();
        assert!(check_manifest(&garbage, &sha, 10, "1.4.0", &rev_b).is_err());
    }
}
