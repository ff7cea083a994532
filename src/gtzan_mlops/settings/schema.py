"""The schema of params.yaml: every setting's type, range and choices, checked once at load.

An unknown key, a missing key or a value of the wrong type is an error naming the key's path
(`train.xgboost.space.max_depth.high: ...`). The schema holds no defaults: every value is the one
written in params.yaml, so no default lives in two places. Stages and libraries receive the
validated `Settings` object and read it by attribute (values coerced to their types: `seed: 3.0`
from `mlflow run` becomes 3).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictStr,
    Tag,
    model_validator,
)

from gtzan_mlops.settings.families import FAMILIES


def _integer(value: Any) -> Any:
    """Whole numbers only: 3 and 3.0 (MLflow passes numeric parameters as floats), not 3.5,
    True or "3"."""
    if isinstance(value, bool | str):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool | str):
        raise ValueError("must be a number")
    if isinstance(value, int | float) and not math.isfinite(value):
        raise ValueError("must be finite")
    return value


Int = Annotated[int, BeforeValidator(_integer)]
Float = Annotated[float, BeforeValidator(_number)]
Count = Annotated[Int, Field(ge=0)]  # 0 means "one per core" where the comment says so
Positive = Annotated[Int, Field(ge=1)]
Share = Annotated[Float, Field(gt=0, lt=1)]
Path = Annotated[StrictStr, Field(min_length=1)]  # relative to the repository root
Scalar = StrictBool | Int | Float | StrictStr | None
FeatureSet = Literal["handcrafted", "musicnn", "both"]
Family = Literal[FAMILIES]  # type: ignore[valid-type]
Metric = Literal["accuracy", "macro_f1", "song_accuracy", "song_macro_f1"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- data -----------------------------------------------------------------------------------


class GtzanSource(Section):
    folder: Path | None
    archive: Path | None
    md5: Annotated[StrictStr, Field(pattern=r"^[0-9a-fA-F]{32}$")]
    mirrors: list[StrictStr]
    download_dir: Path
    retries: Count
    retry_backoff_s: Annotated[Float, Field(ge=0)]
    timeout_s: Annotated[Float, Field(gt=0)]


class DemoSource(Section):
    clips_per_genre: Positive
    duration_s: Annotated[Float, Field(ge=0.01)]
    sample_rate: Annotated[Int, Field(ge=1000)]
    seed: Count


# The quality gates of a clip, in the pipeline (`data`) and the served model (ServedConfig) alike.
MinDuration = Annotated[Float, Field(ge=0)]
SilencePeak = Annotated[Float, Field(ge=0)]
MaxPeak = Annotated[Float, Field(gt=1)]


class Data(Section):
    source: Literal["demo", "gtzan", "local"]
    local_dir: Path | None
    gtzan: GtzanSource
    demo: DemoSource
    min_duration_s: MinDuration
    silence_peak: SilencePeak
    max_peak: MaxPeak

    @model_validator(mode="after")
    def _local_dir_set(self) -> Data:
        if self.source == "local" and not self.local_dir:
            raise ValueError("local_dir must be set when source is local")
        return self


class FingerprintIndex(Section):
    """How the inverted index of fingerprint sub-words picks the candidate pairs."""

    subwords: Annotated[Int, Field(ge=1, le=32)]
    subword_bits: Annotated[Int, Field(ge=8, le=32)]
    min_shared: Positive
    max_key_fingerprints: Annotated[Int, Field(ge=2)]


class Duplicates(Section):
    index: FingerprintIndex
    fingerprint_seconds: Annotated[Float, Field(gt=0)]
    window_s: Annotated[Float, Field(gt=0)]
    max_offset_s: Annotated[Float, Field(ge=0)]
    min_similarity: Annotated[Float, Field(gt=0.5, le=1)]

    @model_validator(mode="after")
    def _window_fits(self) -> Duplicates:
        if self.window_s + self.max_offset_s > self.fingerprint_seconds:
            raise ValueError("window_s + max_offset_s exceed fingerprint_seconds")
        return self


# --- features -------------------------------------------------------------------------------


class Musicnn(Section):
    weights_dir: Path | None


class FeatureSettings(Section):
    """Everything that decides a feature value: `features` but its musicnn checkpoint (recorded
    by its sha256). Stored beside the feature tables and with every served model (`to_dict`),
    and read back through this model, so a stored record is checked as params.yaml is."""

    sample_rate: Annotated[Int, Field(ge=1000)]
    n_fft: Positive
    hop_length: Positive
    n_mfcc: Positive
    clip_seconds: Annotated[Float, Field(gt=0)]
    segment_seconds: Annotated[Float, Field(gt=0)]
    # A final segment this much complete still counts, moved back to end at the clip's end: many
    # GTZAN clips are a few ms short of 30 s and would otherwise lose their tenth segment.
    last_segment_min_fraction: Annotated[Float, Field(gt=0, le=1)]
    # Loudness normalisation (features.handcrafted.normalise_loudness): the RMS level in dBFS
    # every clip is scaled to before any feature is computed (None: off), and the most gain.
    loudness_target_dbfs: Annotated[Float, Field(le=0)] | None
    loudness_max_gain_db: Annotated[Float, Field(ge=0)]

    def to_dict(self) -> dict[str, Any]:
        """The record: these fields only, also of a `Features` section (without `musicnn`)."""
        return {name: getattr(self, name) for name in FeatureSettings.model_fields}


class Features(FeatureSettings):
    musicnn: Musicnn


class Pca(Section):
    seed: Count


# --- split ----------------------------------------------------------------------------------


Sha256 = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


class ArtistFiltered(Section):
    level: Literal["clip", "segment"]
    lists_dir: Path | None
    url: StrictStr
    download_dir: Path
    timeout_s: Annotated[Float, Field(gt=0)]
    sha256: (
        dict[Literal["train_filtered.txt", "valid_filtered.txt", "test_filtered.txt"], Sha256]
        | None
    )


class Split(Section):
    strategy: Literal["clip_stratified", "song_grouped", "random_segments", "artist_filtered"]
    seed: Count
    test_size: Share
    valid_size: Annotated[Float, Field(ge=0, lt=1)]
    artists_file: Path | None
    group_duplicates: StrictBool
    artist_filtered: ArtistFiltered


# --- train ----------------------------------------------------------------------------------


class IntRange(Section):
    type: Literal["int"]
    low: Int
    high: Int
    step: Positive | None = None  # the notation's optional keys: Optuna's own defaults
    log: StrictBool | None = None


class FloatRange(Section):
    type: Literal["float"]
    low: Float
    high: Float
    step: Annotated[Float, Field(gt=0)] | None = None
    log: StrictBool | None = None


class Choice(Section):
    type: Literal["categorical"]
    choices: Annotated[list[Scalar], Field(min_length=1)]


def _space_kind(value: Any) -> str:
    """The union's branch: a mapping's `type` (read again from the model when serialising)."""
    if isinstance(value, IntRange | FloatRange | Choice):
        return value.type
    if isinstance(value, dict):
        return str(value.get("type", "fixed-mapping"))
    return "fixed"


SpaceEntry = Annotated[
    Annotated[IntRange, Tag("int")]
    | Annotated[FloatRange, Tag("float")]
    | Annotated[Choice, Tag("categorical")]
    | Annotated[Scalar, Tag("fixed")],
    Discriminator(
        _space_kind,
        custom_error_type="search_space_entry",
        custom_error_message="must be a fixed value or a mapping with type int, float or "
        "categorical",
    ),
]


class Tuning(Section):
    n_trials: Positive
    defaults: dict[StrictStr, Scalar]
    space: dict[StrictStr, SpaceEntry]


class Pruner(Section):
    n_startup_trials: Count
    n_warmup_steps: Count


class Train(Section):
    families: Annotated[list[Family], Field(min_length=1)]
    feature_sets: Annotated[list[FeatureSet], Field(min_length=1)]
    candidate_feature_sets: list[FeatureSet]
    seed: Count
    objective: Metric
    refit_on: Literal["train", "train_valid"]
    optuna_storage: StrictStr | None
    pruner: Pruner
    demo_max_trials: Positive | None
    demo_max_epochs: Positive | None
    naive_bayes: Tuning
    sgd: Tuning
    knn: Tuning
    decision_tree: Tuning
    random_forest: Tuning
    svm: Tuning
    logistic_regression: Tuning
    mlp: Tuning
    fnn: Tuning
    fnn_simple: Tuning
    xgboost: Tuning

    @model_validator(mode="after")
    def _svm_one_vs_rest(self) -> Train:
        # The SVM's probabilities are calibrated on one decision value per genre.
        for part in (self.svm.space, self.svm.defaults):
            if part.get("decision_function_shape") not in (None, "ovr"):  # None: SVC's own, ovr
                raise ValueError(
                    "svm: decision_function_shape must be 'ovr': calibration reads one decision "
                    "value per genre (SVC classifies one-vs-one whatever this setting says)"
                )
        return self


class Selection(Section):
    source: Literal["validation", "cross_validation"]
    metric: Metric
    folds: Annotated[Int, Field(ge=2)]
    seed: Count


class Uncertainty(Section):
    level: Share
    n_resamples: Annotated[Int, Field(ge=100)]
    seed: Count


class Evaluate(Section):
    candidates: Annotated[list[Family], Field(min_length=1)]
    families: list[Family] | None


class Behaviour(Section):
    min_unchanged: Annotated[Float, Field(ge=0, le=1)]
    gains_db: list[Annotated[Float, Field(lt=0)]]
    shift_s: Annotated[Float, Field(ge=0)]
    resample_rate: Positive
    resample_channels: Positive
    mp3_kbps: Annotated[Int, Field(ge=8, le=320)]


class Promote(Section):
    model_name: Annotated[StrictStr, Field(min_length=1)]
    metric: Literal["song_accuracy", "song_macro_f1"]
    min_improvement: Annotated[Float, Field(ge=0)]
    require_significant: StrictBool
    unloadable_champion: Literal["stop", "absent"]
    experiment_name: Annotated[StrictStr, Field(min_length=1)] | None
    behaviour: Behaviour


class Serving(Section):
    max_rows: Positive
    max_request_mib: Annotated[Float, Field(gt=0)]
    max_upload_mib: Annotated[Float, Field(gt=0)]
    max_audio_seconds: Annotated[Float, Field(gt=0)]
    max_channels: Positive
    max_sample_rate: Positive
    max_decoded_mib: Annotated[Float, Field(gt=0)]
    max_segments: Positive
    max_concurrent_decodes: Positive
    max_queue_wait_s: Annotated[Float, Field(ge=0)]
    request_timeout_s: Annotated[Float, Field(gt=0)]
    musicnn_batch_size: Positive
    allow_audio_path: StrictBool
    audio_root: Path | None  # the only folder audio_path may read (symlinks resolved)

    @model_validator(mode="after")
    def _audio_path_has_a_root(self) -> Serving:
        if self.allow_audio_path and self.audio_root is None:
            raise ValueError("allow_audio_path needs an audio_root to read from")
        return self


class ServedConfig(Serving):
    """A served model's config, `serving` and the gates of `data`: logged with the model and
    read back (with serve-time overrides) through this model, checked as params.yaml is."""

    min_duration_s: MinDuration
    silence_peak: SilencePeak
    max_peak: MaxPeak

    @classmethod
    def of(cls, serving: Serving, data: Data) -> ServedConfig:
        """The config of a model served with these (validated) sections."""
        gates = data.model_dump(include={"min_duration_s", "silence_peak", "max_peak"})
        return cls.model_construct(**serving.model_dump(), **gates)


class Tracking(Section):
    experiment_name: Annotated[StrictStr, Field(min_length=1)]


class FeatureSetComparison(Section):
    features_dir: Path | None
    n_splits: Annotated[Int, Field(ge=2)]
    n_repeats: Positive
    seed: Count


class Report(Section):
    reference_table: Path | None
    segments_table: Path | None
    lists_dir: Path | None
    families: list[Family] | None
    seeds: Annotated[list[Count], Field(min_length=1)]
    test_size: Share
    output_dir: Path
    feature_sets: FeatureSetComparison
    published: dict[Family, Annotated[Float, Field(ge=0, le=1)]]


# --- where and how fast ---------------------------------------------------------------------


class Paths(Section):
    raw: Path
    manifest: Path
    duplicates: Path
    duplicate_pairs: Path
    duplicates_report: Path
    features: Path
    features_cache: Path
    pca: Path
    split: Path
    train_records: Path
    train_reports: Path
    evaluate_reports: Path
    promote_reports: Path
    metrics: Path


class Workers(Section):
    workers: Count


class FeatureResources(Section):
    workers: Count
    chunksize: Positive
    musicnn_batch_size: Positive


class ServeResources(Section):
    processes: Positive
    malloc_arena_max: Positive
    malloc_mmap_threshold_kib: Positive


class RayCluster(Section):
    address: StrictStr | None

    @model_validator(mode="after")
    def _host_port(self) -> RayCluster:
        host, _, port = (self.address or "x:1").rpartition(":")
        if not host or "/" in host or not port.isdigit():
            raise ValueError(
                "address must be the cluster's GCS as host:port (what `ray start --head` prints, "
                "e.g. 10.0.0.5:6379), or null for a local Ray; ray:// addresses are not supported"
            )
        return self


class CatalogResources(Section):
    actors: Count
    batch_size: Positive


class Resources(Section):
    engine: Literal["local", "ray"]
    ray: RayCluster
    catalog: CatalogResources
    fetch: Workers
    duplicates: Workers
    features: FeatureResources
    train: Annotated[Workers, Field(description="Optuna worker processes per stage")]
    serve: ServeResources


class Settings(Section):
    """params.yaml, validated: the one settings object the stages and libraries receive."""

    genres: Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=2)]
    paths: Paths
    resources: Resources
    data: Data
    duplicates: Duplicates
    features: Features
    pca: Pca
    split: Split
    train: Train
    selection: Selection
    uncertainty: Uncertainty
    evaluate: Evaluate
    promote: Promote
    serving: Serving
    mlflow: Tracking
    report: Report

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if len(set(self.genres)) != len(self.genres):
            raise ValueError("genres: a genre is listed twice")
        missing = sorted(set(self.evaluate.candidates) - set(self.train.families))
        if missing:
            raise ValueError(f"evaluate.candidates: {missing} are not in train.families")
        return self


def validated(params: dict[str, Any]) -> Settings:
    """`params` checked against the schema, values coerced to their types; raises
    pydantic's ValidationError (settings.loading.validate_settings turns it into a
    ConfigError)."""
    return Settings.model_validate(params)
