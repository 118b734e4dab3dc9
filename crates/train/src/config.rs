//! `run.toml`: everything a coordinator needs to start a run. Every field has a default,
//! so an empty file is a valid (small) run; `blocktrain coordinator --print-config`
//! shows the full file with its defaults.
use blocktrain_model::config::{EdmConfig, ModelConfig, Schedule};
use blocktrain_model::data::Dataset;
use blocktrain_model::optim::OptimConfig;
use blocktrain_model::run::{Family, Manifest, TrainPlan};
use serde::{Deserialize, Serialize};

pub use crate::merge::{Outer, OuterKind};
use crate::{NodeError, Result};

mod validate;

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Number of blocks: equal masking-rate intervals (masked), or intervals of equal
    /// lognormal sigma mass (edm).
    pub blocks: usize,
    /// Objective family: `masked` (absorbing-state byte diffusion with an exact ELBO
    /// split; ours) or `edm` (Gaussian diffusion of byte embeddings with EDM, as the
    /// BlockTrain paper runs it; settings in `[edm]`).
    pub objective: ObjectiveFamily,
    /// Embedding-diffusion settings, read when `objective = "edm"`.
    pub edm: EdmConfig,
    /// Training corpus: `wikitext2`, `shakespeare` (shipped) or a path on the coordinator
    /// (workers read the same name on their side, or bring `--data`).
    pub dataset: String,
    /// Seeds initial weights, data order and masks.
    pub seed: u64,
    /// Shape of each block's network.
    pub model: ModelConfig,
    /// Workers' inner AdamW and its LR schedule.
    pub optim: OptimConfig,
    /// Rounds, local steps, workers per block.
    pub training: Training,
    /// How a round's deltas become the next version.
    pub outer: Outer,
    /// Update encoding and limits.
    pub wire: Wire,
    /// Timeouts.
    pub faults: Faults,
    /// Who may join.
    pub auth: AuthConfig,
    /// Checks on what workers upload (screening, spot checks).
    pub trust: Trust,
}

/// Which diffusion a run's blocks train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveFamily {
    /// Masked byte diffusion (blocks own masking-rate intervals).
    Masked,
    /// Embedding diffusion with EDM (blocks own sigma intervals).
    Edm,
}

/// Checks on updates beyond their shape ([`crate::trust`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Trust {
    /// Held-out windows (valid split, fixed masks) each update is screened on; 0 turns
    /// screening off (and the held-out CE history with it).
    pub screen_windows: usize,
    /// Refuse an update whose block's held-out loss after it exceeds the loss before by
    /// more than this (nats/byte).
    pub screen_threshold: f64,
    /// Fraction of updates recomputed from the same inputs and compared (0..=1). Each
    /// costs the coordinator one lease of training; workers with their own data are
    /// never sampled (their data is not here).
    pub spot_check_fraction: f64,
}

/// Rounds and local steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Training {
    /// Versions each block goes through; the run is done when every block has them.
    pub rounds: u64,
    /// H: local optimizer steps per round at the reference rate.
    pub local_steps: i64,
    /// Windows per step.
    pub batch: i64,
    /// Most workers training one block in one round (its shards are this many slices).
    pub workers_per_block: u32,
    /// Quorum: a round closes once this many updates are in (0 = workers_per_block), or
    /// `faults.round_timeout_secs` after its first update, whichever comes first. Stale
    /// updates accepted into the round (`max_staleness`) count toward it.
    pub min_updates: u32,
    /// Target seconds per round; with a worker's measured step rate, its H becomes
    /// rate x round_seconds (clamped to [H/4, 4H]) so slow and fast workers finish
    /// together. 0 = every worker trains exactly H steps.
    pub round_seconds: f64,
    /// Where a lease's AdamW moments come from: `carry` (the block's moments, kept by the
    /// coordinator with its weights and averaged like them; [`crate::moments`]) or
    /// `fresh` (zero moments every lease). Both keep every lease recomputable.
    pub optimizer_state: OptimizerState,
    /// K, how many versions old an update may be and still be merged (asynchronous
    /// updates). 0 (the default): an update is merged only into the version it was
    /// computed from, and one for a version the block has left is refused as stale.
    /// With K > 0, an update computed from version v-k, k <= K, joins the block's
    /// current round (it counts toward its quorum) and is merged there, its delta added
    /// to the current weights at weight steps x s(k) (`staleness_exponent`); its lease
    /// stays open across commits while k <= K and keeps its slot (it counts against
    /// `workers_per_block`). Needs `faults.keep_versions` 0 or above K, so the file a
    /// stale lease trained from is still there for its spot check.
    pub max_staleness: u64,
    /// a, FedAsync's polynomial staleness function s(k) = (1 + k)^-a (Xie, Koyejo and
    /// Gupta 2019, arXiv:1903.03934): an update k versions old is merged at s(k) of a
    /// fresh one's weight (0.5: 1/sqrt(2) one version old), with the round's denominator
    /// still the sum of its steps, so a round of fresh updates merges as with K = 0 and
    /// a lone stale update is applied at s(k), not renormalized. Under the `median` and
    /// `trimmed` merge rules each stale delta is scaled by s(k) before the robust
    /// combine. Read only with `max_staleness` > 0; a >= 0 (0: no discount).
    pub staleness_exponent: f64,
}

/// Where a lease's AdamW moments come from (`[training] optimizer_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerState {
    /// The block's moments travel with its weights (down in the checkpoint, up as a
    /// delta with the update) and are averaged like them.
    Carry,
    /// Zero moments at the start of every lease.
    Fresh,
}

/// Update encoding and limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Wire {
    /// Codec workers use for updates: `fp32`, `fp16`, `int8[:chunk]`, `topk:fraction`.
    pub codec: String,
    /// Precision of the checkpoints workers download: fp16 (half the bytes), int8 (per-chunk
    /// scales, a quarter) or fp32. The master copy that merges apply to stays fp32, and a
    /// worker's delta is taken against the copy it trained from.
    pub checkpoint_codec: String,
    /// Reject a delta whose RMS exceeds this multiple of `lr x steps`: AdamW moves a
    /// weight by about lr per step at most, so a larger delta cannot come from the run's
    /// optimizer (a scaled or garbage update).
    pub max_delta_ratio: f64,
}

/// Timeouts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// A lease lapses this long after its last heartbeat; its slot is then re-leased.
    pub lease_secs: f64,
    /// A round closes this long after its first update even without its quorum.
    pub round_timeout_secs: f64,
    /// A lease lapses after this long in all, heartbeats or not (a worker that never
    /// delivers cannot hold a block forever).
    pub max_lease_secs: f64,
    /// Largest accepted clock difference of a signed request.
    pub max_skew_secs: f64,
    /// Checkpoint files kept per block: the newest N versions (0 = all). Older versions
    /// stay in the history with their hashes; only their files go. With
    /// `training.max_staleness` K > 0 it must be 0 or more than K.
    pub keep_versions: u64,
}

/// Who may join a run. With no field set the run is open to any key (the coordinator
/// refuses to start so off loopback unless told `--open-registration`).
///
/// A shared `join_secret` admits any key that knows it, so a worker barred for a failed
/// spot check can come back under a new key; `invites` (one token per operator, bound
/// to the first key that uses it) and `allow` do not let it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Workers prove knowledge of this secret when they register.
    pub join_secret: Option<String>,
    /// Public keys (hex) allowed to register.
    pub allow: Vec<String>,
    /// Single-operator join tokens: a worker passes one as `--join-secret`, and the
    /// first key to use it owns it; another key presenting it is refused.
    pub invites: Vec<String>,
}

impl AuthConfig {
    /// Whether anyone may register (no secret, invite or allowlist).
    pub fn is_open(&self) -> bool {
        self.join_secret.is_none() && self.allow.is_empty() && self.invites.is_empty()
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            blocks: 3,
            objective: ObjectiveFamily::Masked,
            edm: EdmConfig::default(),
            dataset: "wikitext2".into(),
            seed: 0,
            model: ModelConfig::small_block(),
            optim: OptimConfig {
                lr: 2e-3,
                warmup: 20,
                ..Default::default()
            },
            training: Training::default(),
            outer: Outer::default(),
            wire: Wire::default(),
            faults: Faults::default(),
            auth: AuthConfig::default(),
            trust: Trust::default(),
        }
    }
}

impl Default for Trust {
    fn default() -> Self {
        Trust {
            screen_windows: 32,
            screen_threshold: 0.05,
            // 0.05 let flips, noise, other-data and screen-tuned updates through 95% of
            // the time once the screen stopped catching them (docs/RESULTS.md section
            // 9): a quarter of leases recomputed bars such a worker within a 6-round
            // run 82% of the time, at a quarter of a lease's training per lease.
            spot_check_fraction: 0.25,
        }
    }
}

impl Default for Training {
    fn default() -> Self {
        Training {
            rounds: 6,
            local_steps: 50,
            batch: 32,
            workers_per_block: 2,
            min_updates: 0,
            round_seconds: 0.0,
            optimizer_state: OptimizerState::Carry,
            max_staleness: 0,
            staleness_exponent: 0.5,
        }
    }
}

impl Default for Wire {
    fn default() -> Self {
        Wire {
            codec: "fp16".into(),
            checkpoint_codec: "fp16".into(),
            max_delta_ratio: 2.0,
        }
    }
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            lease_secs: 60.0,
            round_timeout_secs: 120.0,
            max_lease_secs: 3600.0,
            max_skew_secs: 300.0,
            keep_versions: 4,
        }
    }
}

impl RunConfig {
    /// Parses a `run.toml`.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: RunConfig =
            toml::from_str(text).map_err(|e| NodeError::Config(format!("run.toml: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// A run's settings as its state directory stored them (the file form, every field
    /// written out). A field whose default changed since a store was written takes the
    /// value it had then when the stored text lacks it, so an old run resumes as it ran:
    /// `training.optimizer_state`, "fresh" before it existed (now "carry"). Such a run
    /// resumed with its original run.toml (which now parses to "carry") is refused as
    /// "other settings"; resume it without --run.
    pub fn from_stored_toml(text: &str) -> Result<Self> {
        let mut raw: toml::Table =
            toml::from_str(text).map_err(|e| NodeError::Config(format!("stored run: {e}")))?;
        let training = raw
            .entry("training")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = training {
            t.entry("optimizer_state")
                .or_insert_with(|| toml::Value::String("fresh".into()));
        }
        Self::from_toml(&toml::to_string(&raw).expect("a parsed table serialises"))
    }

    /// The file form (every field, defaults included).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("run config serialises")
    }

    /// Updates that close a round.
    pub fn quorum(&self) -> u32 {
        match self.training.min_updates {
            0 => self.training.workers_per_block,
            q => q,
        }
    }

    /// Total LR-schedule length of a block: every round's reference H.
    pub fn schedule_total(&self) -> i64 {
        self.training.rounds as i64 * self.training.local_steps
    }

    /// The run as a block-local manifest of its family (what `blocktrain eval` and
    /// `generate` read).
    pub fn manifest(&self) -> Result<Manifest> {
        let plan = TrainPlan {
            steps: self.schedule_total(),
            batch: self.training.batch,
            seed: self.seed,
            dataset: Dataset::parse(&self.dataset),
        };
        let mut model = self.model.clone();
        let family = match self.objective {
            ObjectiveFamily::Masked => Family::Block,
            ObjectiveFamily::Edm => {
                model.edm = Some(self.edm.clone());
                Family::Edm
            }
        };
        Ok(Manifest::new(
            family,
            model,
            Schedule::equal(self.blocks),
            self.optim.clone(),
            plan,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::MergeRule;

    #[test]
    fn empty_file_is_the_default_run_and_round_trips() {
        let cfg = RunConfig::from_toml("").unwrap();
        assert_eq!(cfg, RunConfig::default());
        assert_eq!(RunConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
    }

    /// A store written before `optimizer_state` existed resumes with fresh moments, as
    /// it ran; one that names it keeps what it names.
    #[test]
    fn a_stored_run_without_optimizer_state_resumes_fresh() {
        let stored = RunConfig::default().to_toml();
        assert!(stored.contains("optimizer_state = \"carry\""), "{stored}");
        let old: String = stored
            .lines()
            .filter(|l| !l.starts_with("optimizer_state"))
            .map(|l| format!("{l}\n"))
            .collect();
        let resumed = RunConfig::from_stored_toml(&old).unwrap();
        assert_eq!(resumed.training.optimizer_state, OptimizerState::Fresh);
        assert_eq!(
            RunConfig::from_toml(&old).unwrap().training.optimizer_state,
            OptimizerState::Carry
        );
        assert_eq!(
            RunConfig::from_stored_toml(&stored).unwrap(),
            RunConfig::default()
        );
        // A store with no [training] table at all is as old, and resumes fresh too.
        let bare = RunConfig::from_stored_toml("blocks = 3").unwrap();
        assert_eq!(bare.training.optimizer_state, OptimizerState::Fresh);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = RunConfig::from_toml("[wire]\ncodec = \"zip\"").unwrap_err();
        assert!(e.to_string().contains("zip"), "{e}");
        let e = RunConfig::from_toml("blockz = 3").unwrap_err();
        assert!(e.to_string().contains("blockz"), "{e}");
        let e = RunConfig::from_toml("[auth]\nallow = [\"abc\"]").unwrap_err();
        assert!(e.to_string().contains("abc"), "{e}");
        let e = RunConfig::from_toml("[training]\nrounds = 0").unwrap_err();
        assert!(e.to_string().contains("rounds"), "{e}");
        let e = RunConfig::from_toml("[outer]\nmerge = \"trimmed:0.6\"").unwrap_err();
        assert!(e.to_string().contains("trimmed:0.6"), "{e}");
    }

    #[test]
    fn edm_runs_are_configured_in_their_own_table() {
        let cfg = RunConfig::from_toml("objective = \"edm\"\n[edm]\nembed_dim = 64").unwrap();
        let m = cfg.manifest().unwrap();
        assert_eq!(m.family, Family::Edm);
        assert_eq!(m.model.edm.as_ref().unwrap().embed_dim, 64);
        assert_eq!(RunConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        assert_eq!(
            RunConfig::default().manifest().unwrap().family,
            Family::Block
        );
        let e = RunConfig::from_toml("[edm]\nsigma_min = 20.0").unwrap_err();
        assert!(e.to_string().contains("sigma_min"), "{e}");
        let mut misplaced = RunConfig::default();
        misplaced.model.edm = Some(EdmConfig::default());
        let e = RunConfig::from_toml(&misplaced.to_toml()).unwrap_err();
        assert!(e.to_string().contains("[edm]"), "{e}");
    }

    #[test]
    fn staleness_settings_are_checked_against_the_versions_kept() {
        let cfg = RunConfig::default();
        assert_eq!(
            (cfg.training.max_staleness, cfg.training.staleness_exponent),
            (0, 0.5)
        );
        let ok = RunConfig::from_toml("[training]\nmax_staleness = 3\n[faults]\nkeep_versions = 4")
            .unwrap();
        assert_eq!(RunConfig::from_toml(&ok.to_toml()).unwrap(), ok);
        RunConfig::from_toml("[training]\nmax_staleness = 5\n[faults]\nkeep_versions = 0").unwrap();
        let e = RunConfig::from_toml("[training]\nmax_staleness = 9\n[faults]\nkeep_versions = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds rounds"), "{e}");
        let e = RunConfig::from_toml("[training]\nmax_staleness = 4\n[faults]\nkeep_versions = 4")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("keep_versions = 4")
                && e.contains("max_staleness")
                && e.contains("at least 5"),
            "{e}"
        );
        let e = RunConfig::from_toml("[training]\nstaleness_exponent = -1.0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("staleness_exponent"), "{e}");
    }

    #[test]
    fn merge_rule_round_trips() {
        let cfg = RunConfig::from_toml("[outer]\nmerge = \"trimmed:0.25\"").unwrap();
        assert_eq!(cfg.outer.merge_rule().unwrap(), MergeRule::Trimmed(0.25));
        assert_eq!(RunConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        assert_eq!(
            RunConfig::default().outer.merge_rule().unwrap(),
            MergeRule::Mean
        );
    }
}
