//! The trials of `blocktrain bench attacks`: a warmed run per trial, copied for each
//! attacker, and one upload by each, with what the bench can check beside the verdict.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use blocktrain_model::run::Manifest;
use blocktrain_protocol::codec::{self, Arrays, Codec, ErrorFeedback};
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::receipt::{Claim, RECEIPT_VERSION};
use blocktrain_protocol::wire::{Lease, RegisterRequest, WorkReply, WorkerInfo};
use blocktrain_train::config::RunConfig;
use blocktrain_train::coordinator::Coordinator;
use blocktrain_train::moments;
use blocktrain_train::verify::{relative_error, spot_check_tolerance, Screen};
use blocktrain_train::worker::{decode_checkpoint, shard_of, train_delta, LocalJob, Malice};
use blocktrain_train::NodeError;
use tch::Device;

use crate::cmd::bench_attacks::Attacker;
use crate::cmd::bench_attacks_report::{Outcome, Upload};

/// Everything every trial shares.
pub struct Bench {
    pub cfg: RunConfig,
    pub manifest: Manifest,
    pub train: Vec<u8>,
    pub valid: Vec<u8>,
    pub test: Vec<u8>,
    pub codec: Codec,
    pub seed: u64,
    pub warm_rounds: u64,
    pub root: PathBuf,
}

/// One trial's warmed run, ready to be copied for each attacker.
pub struct Trial {
    pub index: usize,
    pub dir: PathBuf,
    pub coordinator: Identity,
    pub now: u64,
    /// Honest uploads refused while warming (false positives too, but on other leases).
    pub warm_refused: usize,
    /// (lease fields, honest delta, loss) once computed, shared by the attackers.
    pub honest: Option<(String, Arrays, f64)>,
}

/// A reproducible key for `role` number `n` of trial `trial`.
fn identity(seed: u64, role: &str, trial: usize, n: usize) -> Identity {
    let secret = blake3::derive_key(
        "blocktrain bench attacks key",
        format!("{seed}/{role}/{trial}/{n}").as_bytes(),
    );
    Identity::from_secret(&secret).expect("32 bytes are a key")
}

fn join(c: &mut Coordinator, id: &Identity, now: u64) -> Result<()> {
    let req = RegisterRequest {
        info: WorkerInfo::new("cpu"),
        join_proof: None,
    };
    c.register(&id.public_hex(), &req, now)?;
    Ok(())
}

/// Signs and uploads `body` for `lease` as a worker would (its claim names the bytes).
fn upload(
    c: &mut Coordinator,
    id: &Identity,
    lease: &Lease,
    body: &[u8],
    loss: f64,
    data_bytes: u64,
    now: u64,
) -> std::result::Result<(), NodeError> {
    let claim = Claim {
        version: RECEIPT_VERSION,
        worker: id.public_hex(),
        lease: lease.id,
        block: lease.block as u32,
        base_version: lease.version,
        update_blake3: blake3::hash(body).to_hex().to_string(),
        steps: lease.steps,
        data_bytes,
        local_loss: Some(loss),
    };
    let sig = claim.sign(id);
    c.submit_update(
        &id.public_hex(),
        lease.id,
        body,
        Some(loss),
        Some((claim, sig)),
        now,
    )
    .map(|_| ())
}

/// The served checkpoint of `lease`, decoded as a worker decodes it: its weights, and
/// the moments to start from when the run carries optimizer state.
fn served(c: &Coordinator, key: &str, lease: &Lease) -> Result<(Arrays, Option<Arrays>)> {
    let (path, _) = c.checkpoint_file(key, &lease.weights_hash)?;
    let (weights, moments) = moments::split(decode_checkpoint(&std::fs::read(path)?)?);
    Ok((
        weights,
        (lease.carry_moments && !moments.is_empty()).then_some(moments),
    ))
}

/// Weights plus `delta`, name by name.
fn plus(w: &Arrays, delta: &Arrays, scale: f32) -> Arrays {
    let mut out = w.clone();
    for (name, a) in out.iter_mut() {
        let d = &delta[name].data;
        a.data.iter_mut().zip(d).for_each(|(w, d)| *w += scale * d);
    }
    out
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

impl Bench {
    /// An honest worker's update (with the moments' delta when the run carries them)
    /// and its mean loss.
    fn train(
        &self,
        lease: &Lease,
        (base, moments): &(Arrays, Option<Arrays>),
        shard: &[u8],
    ) -> Result<(Arrays, f64)> {
        let job = LocalJob {
            manifest: &self.manifest,
            block: lease.block,
            base,
            lease,
            shard,
            moments: moments.as_ref(),
        };
        let t = train_delta(&job, Device::Cpu, &|| true)?.expect("no stop condition");
        let loss = t.loss;
        Ok((t.update(&job), loss))
    }

    fn shard(&self, lease: &Lease) -> &[u8] {
        let window = self.manifest.model.window;
        shard_of(&self.train, lease.shard_index, lease.shard_count, window)
    }

    /// A new run for trial `i` whose block `i % B` (the one attacked) has trained
    /// `warm_rounds` honest rounds. Only that block is warmed: a block's screen, lease
    /// and verdicts depend on its own state alone, and warming all would triple the cost.
    pub fn warm(&self, i: usize) -> Result<Trial> {
        let dir = self.root.join(format!("trial-{i}"));
        std::fs::create_dir_all(&dir)?;
        let coordinator = identity(self.seed, "coordinator", i, 0);
        let key_file = format!("{}\n", hex_of(&coordinator.secret()));
        std::fs::write(dir.join("coordinator.key"), key_file)?;
        let mut cfg = self.cfg.clone();
        cfg.seed = self.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        let mut c = Coordinator::open(&dir, Some(cfg), 0)?;
        let target = i % self.cfg.blocks;
        let (mut now, mut refused) = (1, 0);
        let lease_ms = (self.cfg.faults.lease_secs * 1000.0) as u64 + 1;
        // One fresh honest key per lease, as many workers would be.
        for n in 0.. {
            if c.status()?.blocks[target].version >= self.warm_rounds {
                break;
            }
            if n > 50 * (self.warm_rounds as usize + 1) {
                bail!("warming block {} did not finish", target + 1);
            }
            let id = identity(self.seed, "warm", i, n);
            join(&mut c, &id, now)?;
            now += 1;
            match c.request_work(&id.public_hex(), &WorkerInfo::new("cpu"), now)? {
                WorkReply::Lease(l) if l.block == target => {
                    let base = served(&c, &id.public_hex(), &l)?;
                    let shard = self.shard(&l);
                    let (d, loss) = self.train(&l, &base, shard)?;
                    let body = ErrorFeedback::default().encode(&d, self.codec);
                    now += 1;
                    if upload(&mut c, &id, &l, &body, loss, shard.len() as u64, now).is_err() {
                        refused += 1;
                    }
                }
                // A lease of another block is left to lapse (a worker cannot decline
                // one); once every slot is taken, time moves on.
                WorkReply::Lease(_) => {}
                WorkReply::Wait { .. } => {
                    now += lease_ms;
                    c.tick(now)?;
                }
                WorkReply::Done => bail!("the run finished while warming"),
            }
        }
        // Leases left open lapse, so every block starts the attack with free slots.
        now += lease_ms;
        c.tick(now)?;
        drop(c);
        Ok(Trial {
            index: i,
            dir,
            coordinator,
            now,
            warm_refused: refused,
            honest: None,
        })
    }

    /// One upload by `attacker` in a copy of `trial`'s run.
    pub fn attack(&self, trial: &mut Trial, attacker: Attacker) -> Result<Upload> {
        let i = trial.index;
        let dir = trial.dir.with_extension(attacker.name());
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&trial.dir, &dir)?;
        let mut now = trial.now + 1;
        let mut c = Coordinator::open(&dir, None, now)?;
        // Blocks are leased to the least busy, then the furthest behind, then the
        // lowest: idle leases on the blocks that would come first make the attacker's
        // lease land on the warmed block i % B (so the trials cover every block).
        let blocks = self.cfg.blocks;
        let target = i % blocks;
        let idle = if self.warm_rounds == 0 {
            target
        } else {
            blocks - 1
        };
        for n in 0..idle {
            let id = identity(self.seed, "idle", i, n);
            join(&mut c, &id, now)?;
            c.request_work(&id.public_hex(), &WorkerInfo::new("cpu"), now)?;
        }
        let id = identity(self.seed, &attacker.name(), i, 0);
        let key = id.public_hex();
        join(&mut c, &id, now)?;
        let lease = match c.request_work(&key, &WorkerInfo::new("cpu"), now)? {
            WorkReply::Lease(l) => l,
            other => bail!("expected a lease, got {other:?}"),
        };
        if lease.block != target || lease.version != self.warm_rounds {
            bail!(
                "the attacker's lease is for block {} v{}, not the warmed block {} v{}: the coordinator's assignment rule changed",
                lease.block + 1, lease.version, target + 1, self.warm_rounds
            );
        }
        let base = served(&c, &key, &lease)?;
        let shard = self.shard(&lease);
        // The lease is the same for every attacker of a trial (same state, same
        // requests), so the honest delta is trained once; the tag guards that.
        let tag = format!(
            "{}/{}/{}/{}/{}/{}",
            lease.id, lease.block, lease.version, lease.seed, lease.shard_index, lease.weights_hash
        );
        if trial.honest.as_ref().is_none_or(|(t, _, _)| *t != tag) {
            let (d, loss) = self.train(&lease, &base, shard)?;
            trial.honest = Some((tag, d, loss));
        }
        let (_, honest, honest_loss) = trial.honest.as_ref().expect("set above");
        let mut proxy_change = None;
        let mut scale = None;
        let (sent, loss, data_bytes) = match attacker {
            Attacker::Honest => (honest.clone(), *honest_loss, shard.len()),
            Attacker::Flip => (
                Malice::Flip.apply(honest, lease.seed),
                *honest_loss,
                shard.len(),
            ),
            Attacker::X3 => (
                Malice::Scale(3.0).apply(honest, lease.seed),
                *honest_loss,
                shard.len(),
            ),
            Attacker::Noise => (
                Malice::Random.apply(honest, lease.seed),
                *honest_loss,
                shard.len(),
            ),
            Attacker::Zero => (
                Malice::Scale(0.0).apply(honest, lease.seed),
                *honest_loss,
                shard.len(),
            ),
            Attacker::OtherData => {
                let (d, loss) = self.train(&lease, &base, &self.valid)?;
                (d, loss, self.valid.len())
            }
            Attacker::Tuned => {
                let (d, s, change) = self.tune(&lease, &base.0, honest, i)?;
                (proxy_change, scale) = (Some(change), Some(s));
                (d, *honest_loss, shard.len())
            }
        };
        let body = ErrorFeedback::default().encode(&sent, self.codec);
        let shapes = codec::header_shapes(&body)?;
        let (decoded, body_codec) = codec::decode(&body, &shapes, usize::MAX)?;
        // What the coordinator decides from before the upload: its secret screen (as
        // the bench rebuilds it), the threshold now, the spot-check draw.
        let block = lease.block;
        let threshold = c.screen_threshold(block);
        let status = c.status()?;
        let master = {
            let (path, _) = c.checkpoint_file(&key, &status.blocks[block].weights)?;
            decode_checkpoint(&std::fs::read(path)?)?
        };
        let screen = self.secret_screen(&trial.coordinator, block)?;
        let before = screen.loss(&master)?;
        let theirs = status.blocks[block].heldout.unwrap_or(f64::NAN);
        if (before - theirs).abs() > 1e-9 {
            bail!("the rebuilt screen gives {before} where the coordinator's gives {theirs}: the bench no longer mirrors how the coordinator seeds its screen");
        }
        let change = screen.loss(&plus(&master, &decoded, 1.0))? - before;
        let sampled = {
            let secret =
                blake3::derive_key("blocktrain spot-check sample", &trial.coordinator.secret());
            let fraction = self.cfg.trust.spot_check_fraction;
            blocktrain_train::trust::sampled_for_spot_check(
                &secret,
                &format!("lease/{}", lease.id),
                fraction,
            )
        };
        let rel_error = relative_error(&decoded, honest);
        now += 1;
        let result = upload(&mut c, &id, &lease, &body, loss, data_bytes as u64, now);
        let flagged = c.status()?.flagged.iter().any(|f| f.key == key);
        let outcome = match &result {
            Ok(()) => Outcome::Accepted,
            Err(_) if flagged => Outcome::Flagged,
            Err(NodeError::Rejected(m)) if m.contains("held-out screening") => Outcome::Screen,
            Err(NodeError::Rejected(m)) if m.contains("empty update") || m.contains("exceeds") => {
                Outcome::Norm
            }
            Err(e) => Outcome::Other(e.to_string()),
        };
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Upload {
            trial: i,
            attacker: attacker.name(),
            block,
            version: lease.version,
            outcome,
            sampled,
            rel_error,
            would_flag: rel_error > spot_check_tolerance(&body_codec),
            change,
            threshold,
            scale,
            proxy_change,
        })
    }

    /// The coordinator's screen of `block`, seeded from its key as `Coordinator::open` does.
    fn secret_screen(&self, coordinator: &Identity, block: usize) -> Result<Screen> {
        let key = blake3::derive_key("blocktrain held-out screen", &coordinator.secret());
        let seed = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
        let windows = self.cfg.trust.screen_windows;
        Ok(Screen::new(
            &self.manifest,
            block,
            windows,
            seed,
            Device::Cpu,
        )?)
    }

    /// The tuned attacker: -s x delta with the largest s in 1, 2^-1/2, ... 2^-8 whose
    /// change on its own proxy (128 windows of the public test split, its own masks)
    /// is under the configured threshold. It never sees the secret screen.
    fn tune(
        &self,
        lease: &Lease,
        base: &Arrays,
        honest: &Arrays,
        trial: usize,
    ) -> Result<(Arrays, f64, f64)> {
        let seed = u64::from_le_bytes(
            blake3::hash(format!("proxy/{}/{trial}", self.seed).as_bytes()).as_bytes()[..8]
                .try_into()
                .expect("8 bytes"),
        );
        let proxy = Screen::from_bytes(
            &self.manifest,
            lease.block,
            &self.test,
            128,
            seed,
            Device::Cpu,
        )?;
        let before = proxy.loss(base)?;
        let line = self.cfg.trust.screen_threshold;
        let mut last = (1.0, f64::NAN);
        for k in 0..=16 {
            let s = 0.5f64.powf(k as f64 / 2.0);
            let change = proxy.loss(&plus(base, honest, -s as f32))? - before;
            last = (s, change);
            if change < line {
                break;
            }
        }
        let (s, change) = last;
        Ok((
            Malice::Scale(-s as f32).apply(honest, lease.seed),
            s,
            change,
        ))
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
