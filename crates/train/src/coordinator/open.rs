//! Opening a run: creating the state directory and version 0 of every block, or
//! resuming the run it holds (checking the settings, repairing what a kill left, and
//! rebuilding the core, the screens and the weights from the journal). Kept apart from
//! `mod.rs`, which holds the coordinator's state and small accessors: this is the one
//! long start-up sequence, run once per process.

use super::*;

impl Coordinator {
    /// Opens the run in `state_dir`, creating it from `cfg` when the directory is new.
    /// A directory that already holds a run resumes it; `cfg`, if given, must match.
    pub fn open(state_dir: &Path, cfg: Option<RunConfig>, now: u64) -> Result<Self> {
        std::fs::create_dir_all(state_dir).map_err(crate::io_err(state_dir))?;
        let mut store = Store::open(state_dir)?;
        let cfg = match (store.meta("config")?, cfg) {
            (Some(stored), given) => {
                let stored = RunConfig::from_stored_toml(&stored)?;
                if let Some(given) = given {
                    if given != stored {
                        return Err(NodeError::Config(format!(
                            "{} already holds a run with other settings; use a new --state \
                             directory, or omit --run to resume it",
                            state_dir.display()
                        )));
                    }
                }
                stored
            }
            (None, Some(given)) => {
                given.validate()?;
                store.set_meta("config", &given.to_toml())?;
                given
            }
            (None, None) => {
                return Err(NodeError::Config(format!(
                    "{} holds no run yet: pass --run run.toml to start one",
                    state_dir.display()
                )))
            }
        };
        let model_dir = state_dir.join("model");
        let mut model = if model_dir.join("run.json").exists() {
            RunDir::open_writer(&model_dir)?
        } else {
            RunDir::create(&model_dir, cfg.manifest()?)?
        };
        // Version 0 of every block (also those a kill during first start left out).
        let present = store.heads()?.len();
        {
            for block in present..cfg.blocks {
                let trainer = model.trainer(block, tch::Device::Cpu)?;
                let weights = tensors::to_arrays(&trainer.weights())?;
                let bytes = encode_weights(&weights);
                let head = BlockHead {
                    block,
                    version: 0,
                    weights: store.put_blob(&bytes)?,
                    wire: store.put_blob(&encode_wire(&weights, &cfg))?,
                    momentum: None,
                    steps: 0,
                };
                store.commit_version(&head, &[], cfg.training.max_staleness, now)?;
                model.save_weights(block, &bytes, 0)?;
            }
        }
        store.extend_active_leases(now + (cfg.faults.lease_secs * 1000.0) as u64)?;
        let removed = store.collect_garbage()?;
        if removed > 0 {
            tracing::info!("removed {removed} unreferenced blobs (left by an interrupted write)");
        }
        let mut shapes = Vec::new();
        let mut current = Vec::new();
        for head in store.heads()? {
            let bytes = store.get_blob(&head.weights)?;
            let s = codec::header_shapes(&bytes).map_err(|e| NodeError::Config(e.to_string()))?;
            let (w, _) = codec::decode(&bytes, &s, usize::MAX)
                .map_err(|e| NodeError::Config(e.to_string()))?;
            // The exported model directory follows the database (it may lag after a crash).
            if model.manifest.parts[head.block].weights_hash.as_deref()
                != Some(&blocktrain_model::checkpoint::content_hash(&bytes))
            {
                model.save_weights(head.block, &bytes, head.steps)?;
            }
            shapes.push(s);
            current.push(Arc::new(w));
        }
        let identity = crate::keys::load_or_create_key(&state_dir.join("coordinator.key"))?;
        let ledger = Ledger::open(store.conn(), identity.clone())?;
        // Held-out screens (fixed windows and masks) and each current version's loss. The
        // draws are seeded from the coordinator's secret, not the run's public seed, so a
        // worker cannot tune an update against them.
        let (mut screens, mut heldout) = (Vec::new(), Vec::new());
        if cfg.trust.screen_windows > 0 {
            let key = blake3::derive_key("blocktrain held-out screen", &identity.secret());
            let seed = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
            for (b, head) in store.heads()?.iter().enumerate() {
                let screen = crate::verify::Screen::new(
                    &model.manifest,
                    b,
                    cfg.trust.screen_windows,
                    seed,
                    tch::Device::Cpu,
                )?;
                // Recomputed at every start (one forward pass per block), so the loss an
                // update is compared with always comes from these very draws.
                let loss = screen.loss(&current[b])?;
                store.put_version_loss(b, head.version, loss, now)?;
                screens.push(Arc::new(Mutex::new(screen)));
                heldout.push(loss);
            }
        }
        let screen_changes = (0..cfg.blocks)
            .map(|b| {
                store
                    .recent_screen_changes(b, submit::SCREEN_CALIBRATION_WINDOW)
                    .map(VecDeque::from)
            })
            .collect::<Result<_>>()?;
        let rules = rules::rules_of(&cfg, &model.manifest, &shapes);
        let secrets = crate::core::Secrets {
            reseed: blake3::derive_key("blocktrain lease reseed", &identity.secret()),
            check_lease: blake3::derive_key("blocktrain check lease", &identity.secret()),
        };
        let rebuild = store.rebuild(cfg.training.max_staleness)?;
        let core = Core::new(rules, secrets, rebuild, now);
        let mut c = Coordinator {
            store,
            ledger,
            identity,
            cfg,
            screen_changes,
            core: Arc::new(Mutex::new(core)),
            stalls_checked: 0,
            deferred_sync: false,
            doomed: Default::default(),
            screens,
            heldout,
            corpus: None,
            shapes,
            current,
            model,
            state_dir: state_dir.to_path_buf(),
        };
        let issued = c.issue_missing_receipts(now)?;
        if issued > 0 {
            tracing::warn!("issued {issued} receipt(s) an interrupted run left out");
        }
        Ok(c)
    }
}
