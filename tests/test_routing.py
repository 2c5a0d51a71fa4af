"""Routing rules: the shipped defaults, explanations, validation and `rules test` output."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from worker.routing import (
    ROUTED_ATTRIBUTES,
    PipelineSpec,
    RoutingRules,
    RulesError,
    explain_paths,
    series_attributes,
)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def rules() -> RoutingRules:
    return RoutingRules.load()


def chest_pa(**extra: str) -> dict[str, str]:
    attrs = {
        "Modality": "CR",
        "SOPClassUID": CR,
        "BodyPartExamined": "CHEST",
        "ViewPosition": "PA",
        "SeriesDescription": "Chest PA",
    }
    attrs.update(extra)
    return attrs


def ct_abdomen(**extra: str) -> dict[str, str]:
    attrs = {
        "Modality": "CT",
        "SOPClassUID": CT,
        "BodyPartExamined": "ABDOMEN",
        "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
        "SeriesDescription": "Abdomen portal venous 1.0",
    }
    attrs.update(extra)
    return attrs


# ------------------------------------------------------------------------- default rules


def test_default_rules_load_with_pipelines(rules: RoutingRules) -> None:
    assert set(rules.pipelines) == {"cxr-classification", "liver-segmentation"}
    cxr = rules.pipelines["cxr-classification"]
    assert cxr == PipelineSpec("cxr-classification", "gpu", "cxr-resnet18", cxr.description)
    assert cxr.description
    assert rules.pipelines["liver-segmentation"].model == "liver-unet3d"
    assert RoutingRules.load(None).rules == rules.rules


def test_chest_pa_routes_to_cxr(rules: RoutingRules) -> None:
    assert [p.name for p in rules.select(chest_pa())] == ["cxr-classification"]


@pytest.mark.parametrize(
    "changes",
    [
        {"Modality": "DX", "SOPClassUID": DX, "ViewPosition": "AP"},
        {"BodyPartExamined": "", "ViewPosition": ""},  # absent = empty
        {"BodyPartExamined": " chest ", "Modality": "cr"},  # case and spaces ignored
    ],
)
def test_chest_variants_route_to_cxr(rules: RoutingRules, changes: dict[str, str]) -> None:
    assert [p.name for p in rules.select(chest_pa(**changes))] == ["cxr-classification"]


def test_missing_keys_count_as_absent(rules: RoutingRules) -> None:
    attrs = {"Modality": "CR", "SOPClassUID": CR}  # no body part, no view position
    assert [p.name for p in rules.select(attrs)] == ["cxr-classification"]


@pytest.mark.parametrize(
    "changes",
    [
        {"SeriesDescription": "Chest LAT"},
        {"SeriesDescription": "thorax lateral"},
        {"ViewPosition": "LL"},
        {"BodyPartExamined": "KNEE"},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"},  # secondary capture of a radiograph
    ],
)
def test_non_frontal_chest_is_not_routed(rules: RoutingRules, changes: dict[str, str]) -> None:
    assert rules.select(chest_pa(**changes)) == []


def test_ct_abdomen_routes_to_liver(rules: RoutingRules) -> None:
    assert [p.name for p in rules.select(ct_abdomen())] == ["liver-segmentation"]
    assert [p.name for p in rules.select(ct_abdomen(BodyPartExamined="abdomen pelvis"))] == [
        "liver-segmentation"
    ]


def test_ct_localizer_is_excluded(rules: RoutingRules) -> None:
    assert rules.select(ct_abdomen(ImageType="ORIGINAL\\PRIMARY\\LOCALIZER")) == []
    assert rules.select(ct_abdomen(SeriesDescription="Topogram 0.6 T20f")) == []


def test_mr_routes_nowhere(rules: RoutingRules) -> None:
    attrs = {"Modality": "MR", "SOPClassUID": MR, "BodyPartExamined": "ABDOMEN"}
    assert rules.select(attrs) == []
    assert not any(e.matched for e in rules.explain(attrs))


# -------------------------------------------------------------------------- explanations


def test_explanation_reasons_for_a_match(rules: RoutingRules) -> None:
    by_rule = {e.rule_name: e for e in rules.explain(chest_pa())}
    chest = by_rule["chest radiograph"]
    assert chest.matched and chest.pipeline == "cxr-classification"
    assert "Modality 'CR' in [CR, DX]" in chest.reasons
    assert "BodyPartExamined 'CHEST' in [CHEST, '']" in chest.reasons
    assert "ViewPosition 'PA' in [PA, AP, '']" in chest.reasons
    assert any(
        r.startswith("exclude: SeriesDescription 'Chest PA' does not match") for r in chest.reasons
    )
    ct = by_rule["abdominal CT"]
    assert not ct.matched
    assert "Modality 'CR' not in [CT]" in ct.reasons


def test_explanation_reasons_for_misses(rules: RoutingRules) -> None:
    chest = rules.explain(chest_pa(BodyPartExamined="KNEE", SeriesDescription="Knee LAT"))[0]
    assert not chest.matched
    assert "BodyPartExamined 'KNEE' not in [CHEST, '']" in chest.reasons
    assert any(
        r.startswith("exclude: SeriesDescription 'Knee LAT' matches /") for r in chest.reasons
    )
    ct = rules.explain(ct_abdomen(ImageType="ORIGINAL\\PRIMARY\\LOCALIZER"))[1]
    assert "exclude: ImageType 'ORIGINAL\\PRIMARY\\LOCALIZER' contains LOCALIZER" in ct.reasons


# ------------------------------------------------------------------------ custom rules


def rules_text(rules_yaml: str, pipelines_yaml: str | None = None) -> str:
    pipelines = pipelines_yaml or textwrap.dedent(
        """\
        pipelines:
          cxr: {queue: gpu, model: cxr-resnet18}
          notes: {queue: cpu, model: minilm, description: "text"}
        """
    )
    return pipelines + textwrap.dedent(rules_yaml)


def test_regex_any_contains_and_order() -> None:
    text = rules_text(
        """\
        rules:
          - name: by description
            pipeline: notes
            match:
              SeriesDescription: {regex: '^CXR\\b'}
              ProtocolName: {any: true}
          - name: original chest
            pipeline: cxr
            match:
              Modality: DX
              ImageType: {contains: [original]}
          - name: again
            pipeline: notes
            match: {Modality: [DX]}
          - name: switched off
            pipeline: cxr
            enabled: false
            match: {Modality: [DX]}
        """
    )
    rules = RoutingRules.parse(text, "custom.yaml")
    attrs = {"Modality": "DX", "ImageType": "ORIGINAL\\PRIMARY", "SeriesDescription": "CXR 2v"}
    assert [p.name for p in rules.select(attrs)] == ["notes", "cxr"]  # distinct, rule order
    explained = rules.explain(attrs)
    assert [e.matched for e in explained] == [True, True, True, False]
    assert "ProtocolName '': any value accepted" in explained[0].reasons
    assert explained[3].reasons == ("rule disabled",)
    # regex is case-sensitive unless the pattern says otherwise
    assert [p.name for p in rules.select({**attrs, "SeriesDescription": "cxr"})] == ["cxr", "notes"]


def test_load_from_file_and_empty_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text("rules: []\n"))
    rules = RoutingRules.load(path)
    assert rules.source == str(path)
    assert rules.rules == ()
    assert rules.select({"Modality": "CR"}) == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "rules:\n  - name: chest\n    pipeline: cxr\n    match: {Modalty: [CR]}\n",
            [
                "rules.yaml",
                "rule 'chest'",
                "unknown attribute 'Modalty'",
                "did you mean 'Modality'",
            ],
        ),
        (
            "rules:\n  - name: chest\n    pipeline: cxr-net\n    match: {Modality: [CR]}\n",
            ["rules.yaml", "rule 'chest'", "unknown pipeline 'cxr-net'", "cxr, notes"],
        ),
        (
            "rules:\n  - name: chest\n    pipeline: cxr\n    match: {Modality: [CR]}\n"
            "    exlude: {ViewPosition: [LL]}\n",
            ["rule 'chest'", "unknown key 'exlude'", "did you mean 'exclude'"],
        ),
        (
            "rules:\n  - name: chest\n    pipeline: cxr\n"
            "    match: {SeriesDescription: {regex: '(unclosed'}}\n",
            ["rules.yaml", "rule 'chest'", "bad regular expression '(unclosed'"],
        ),
        (
            "rules:\n  - name: chest\n    pipeline: cxr\n    match: {Modality: {regexp: CR}}\n",
            ["rule 'chest'", "exactly one of regex, contains, any"],
        ),
        (
            "rules:\n  - name: chest\n    pipeline: cxr\n    match: {}\n",
            ["rule 'chest'", "at least one condition"],
        ),
        (
            "rules:\n  - pipeline: cxr\n    match: {Modality: [CR]}\n",
            ["rule #1", "missing 'name'"],
        ),
        (
            "rules:\n  - name: chest\n    pipeline: cxr\n    match: {SeriesNumber: ['1']}\n",
            ["rule 'chest'", "unknown attribute 'SeriesNumber'", "known: Modality"],
        ),
        (
            "rules:\n  - name: chest\n    pipeline: cxr\n    match: {Modality: [1.2]}\n",
            ["rule 'chest'", "value 1.2", "quote it"],
        ),
        (
            "rules:\n  - name: chest\n    pipeline: cxr\n    match: {Modality: [CR]}\n"
            "  - name: Chest\n    pipeline: cxr\n    match: {Modality: [DX]}\n",
            ["rule 'Chest'", "duplicate rule name"],
        ),
        (
            "rules:\n  - name: chest\n    pipeline: cxr\n"
            "    match: {Modality: [CR], Modality: [DX]}\n",
            ["rules.yaml", "duplicate key 'Modality'"],
        ),
        ("rules: [\n", ["rules.yaml", "invalid YAML", "line"]),
        (
            "rules:\n  - name: off\n    pipeline: cxr\n    match: {Modality: [CR]}\n",
            ["rule #1", "name False", "quote it"],
        ),
        ("rulez: []\n", ["rules.yaml", "unknown key 'rulez'", "did you mean 'rules'"]),
    ],
)
def test_malformed_rules_are_refused(tmp_path: Path, body: str, expected: list[str]) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(body))
    with pytest.raises(RulesError) as info:
        RoutingRules.load(path)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize(
    ("pipelines", "expected"),
    [
        (
            "pipelines:\n  cxr: {queue: tpu, model: m}\n",
            ["pipeline 'cxr'", "queue 'tpu'", "gpu, cpu"],
        ),
        ("pipelines:\n  cxr: {model: m}\n", ["pipeline 'cxr'", "missing 'queue'"]),
        ("pipelines:\n  cxr: {queue: cpu, model: ../etc}\n", ["pipeline 'cxr'", "'model'"]),
        ("pipelines:\n  cxr: {queue: cpu, model: m, gpu: 1}\n", ["unknown key 'gpu'"]),
        ("pipelines: {}\n", ["'pipelines' must be a non-empty mapping"]),
        ("version: 2\npipelines:\n  cxr: {queue: cpu, model: m}\n", ["unsupported version 2"]),
    ],
)
def test_malformed_pipelines_are_refused(
    tmp_path: Path, pipelines: str, expected: list[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(pipelines + "rules: []\n")
    with pytest.raises(RulesError) as info:
        RoutingRules.load(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_file_is_a_rules_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read the rules file"):
        RoutingRules.load(tmp_path / "nope.yaml")


def test_python_objects_are_not_constructed(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(RulesError, match="invalid YAML"):
        RoutingRules.load(path)


# ------------------------------------------------------------------- DICOM and reports


def write_instance(path: Path, **attrs: object) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = attrs["SOPClassUID"]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-SECRET-42"
    ds.StudyInstanceUID = generate_uid()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_series_attributes_reads_routed_keywords(tmp_path: Path) -> None:
    path = write_instance(
        tmp_path / "ct.dcm",
        SOPClassUID=CT,
        Modality="CT",
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        BodyPartExamined="ABDOMEN",
        SeriesInstanceUID=generate_uid(),
    )
    attrs = series_attributes(pydicom.dcmread(path, stop_before_pixels=True))
    assert tuple(attrs) == ROUTED_ATTRIBUTES
    assert attrs["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert attrs["Modality"] == "CT"
    assert attrs["ViewPosition"] == ""


def test_explain_paths_report(tmp_path: Path, rules: RoutingRules) -> None:
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    cr_series = generate_uid()
    mr_series = generate_uid()
    write_instance(
        folder / "a.dcm",
        SOPClassUID=CR,
        Modality="CR",
        BodyPartExamined="CHEST",
        ViewPosition="PA",
        SeriesInstanceUID=cr_series,
        SeriesNumber=3,
    )
    write_instance(
        folder / "sub" / "b",
        SOPClassUID=MR,
        Modality="MR",
        SeriesInstanceUID=mr_series,
        SeriesNumber=7,
    )
    (folder / "notes.txt").write_text("not an image\n")

    report = explain_paths(rules, [folder])

    assert "2 DICOM files in 2 series; 1 file skipped." in report
    assert "Series CR #3 [" in report
    assert "Series MR #7 [" in report
    assert "MATCH     chest radiograph -> cxr-classification" in report
    assert "Modality 'MR' not in [CR, DX]" in report
    assert "Pipelines: cxr-classification (queue gpu, model cxr-resnet18)" in report
    assert "Pipelines: none" in report
    assert "notes.txt: not DICOM" in report
    # series are named by a hash, never by patient data or the raw UID
    for secret in ("Doe", "PID-SECRET-42", cr_series, mr_series):
        assert secret not in report
    # the CR series comes first (sorted by modality) and its block ends with its pipelines
    cr_block = report.split("Series CR #3")[1].split("Series MR")[0]
    assert "Pipelines: cxr-classification" in cr_block


def test_explain_paths_groups_instances_and_reports_missing(
    tmp_path: Path, rules: RoutingRules
) -> None:
    series = generate_uid()
    files = [
        write_instance(
            tmp_path / f"{i}.dcm",
            SOPClassUID=CT,
            Modality="CT",
            BodyPartExamined="ABDOMEN",
            SeriesInstanceUID=series,
            SeriesNumber=2,
        )
        for i in range(3)
    ]
    report = explain_paths(rules, [*files, tmp_path / "missing.dcm"])
    assert "3 DICOM files in 1 series; 1 file skipped." in report
    assert "(3 instances)" in report
    assert "Pipelines: liver-segmentation" in report
    assert "missing.dcm: not found" in report
