"""Treatment suggestion: biomarker parsing, evidence table, ranking, model directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from models.card import CARD_FILE, ModelLoadError, read_model_card
from models.treatment import (
    EvidenceTable,
    TreatmentModel,
    assess,
    build_model_dir,
    parse_biomarkers,
    parse_cancer_types,
    suggest,
)
from models.treatment.biomarkers import BiomarkerKind, normalise_protein_change
from models.treatment.scorer import DEFAULT_EVIDENCE, EvidenceTableError

LOINC = "http://loinc.org"


def coded(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def component(loinc: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"code": coded(LOINC, loinc), "valueCodeableConcept": value}


def variant(
    rid: str,
    gene: str,
    hgnc: str,
    protein: str | None = None,
    *,
    extra: tuple[dict[str, Any], ...] = (),
    present: str = "LA9633-4",
) -> dict[str, Any]:
    components = [component("48018-6", coded("http://www.genenames.org/geneId", hgnc, gene))]
    if protein:
        components.append(component("48005-3", coded("http://varnomen.hgvs.org", protein)))
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": coded(LOINC, "69548-6", "Genetic variant assessment"),
        "valueCodeableConcept": coded(LOINC, present),
        "component": components + list(extra),
    }


def coded_observation(rid: str, loinc: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": coded(LOINC, loinc),
        "valueCodeableConcept": value,
    }


def quantity_observation(rid: str, loinc: str, value: float, unit: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": coded(LOINC, loinc),
        "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": unit},
    }


def condition(rid: str, system: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": rid, "code": coded(system, code)}


SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
NSCLC = condition("nsclc", SNOMED, "254637007")
EGFR_L858R = variant("egfr", "EGFR", "HGNC:3236", "NM_005228.5:NP_005219.2:p.Leu858Arg")


def run(observations: list[dict[str, Any]], conditions: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    findings = parse_biomarkers(observations)
    cancers = parse_cancer_types(conditions)
    return findings, cancers, assess(findings.biomarkers, cancers.cancer_types)


def test_protein_changes_are_normalised_to_one_letter_hgvs() -> None:
    assert normalise_protein_change("NP_005219.2:p.(Leu858Arg)") == "L858R"
    assert normalise_protein_change("p.Glu746_Ala750del") == "E746_A750del"
    assert normalise_protein_change("p.G12C") == "G12C"
    assert normalise_protein_change("not a change") is None


def test_egfr_l858r_nsclc_gets_osimertinib_first_with_its_source() -> None:
    findings, cancers, result = run([EGFR_L858R], [NSCLC])
    assert findings.skipped == () and cancers.skipped == ()
    first = result.suggestions[0]
    assert first.therapy == "osimertinib"
    assert [(d.name, d.rxnorm) for d in first.drugs] == [("osimertinib", "1721560")]
    evidence = first.evidence[0]
    assert evidence.level == "1" and evidence.source_id == "fda-tagrisso-1l"
    assert "TAGRISSO" in evidence.citation and "FLAURA" in evidence.citation
    assert "TAGRISSO" in first.rationale and "not an order" in first.rationale
    assert set(first.basis) == {"Observation/egfr", "Condition/nsclc"}
    # Other first-line EGFR TKIs follow, ranked below the guideline-preferred one.
    others = [s.therapy for s in result.suggestions[1:]]
    assert set(others) == {"erlotinib", "gefitinib", "dacomitinib"}
    assert all(s.score < first.score for s in result.suggestions[1:])


def test_exon_19_deletion_is_matched_by_its_class_rule() -> None:
    deletion = variant("del19", "EGFR", "HGNC:3236", "p.Glu746_Ala750del")
    _, _, result = run([deletion], [NSCLC])
    assert result.suggestions[0].therapy == "osimertinib"
    assert result.suggestions[0].evidence[0].row_id == "egfr-ex19del-nsclc-osimertinib"
    # A frameshift in exon 19 is not an in-frame deletion and gets nothing.
    frameshift = variant("fs", "EGFR", "HGNC:3236", "p.Glu746fs")
    assert (
        suggest(parse_biomarkers([frameshift]).biomarkers, parse_cancer_types([NSCLC]).cancer_types)
        == []
    )


def test_msi_high_gets_tumour_agnostic_pembrolizumab() -> None:
    msi = coded_observation("msi", "81695-9", coded(LOINC, "LA26203-2", "MSI-H"))
    pancreas = condition("panc", ICD10, "C25.9")
    _, cancers, result = run([msi], [pancreas])
    assert cancers.cancer_types[0].key == "solid_other"
    (only,) = result.suggestions
    assert only.therapy == "pembrolizumab"
    assert only.evidence[0].row_id == "msi-h-solid-pembrolizumab"
    assert "tumour-agnostic" in only.evidence[0].cancer
    # In colorectal cancer the cancer-specific rows rank above the pan-tumour row.
    _, _, crc = run([msi], [condition("crc", ICD10, "C18.7")])
    pembro = next(s for s in crc.suggestions if s.therapy == "pembrolizumab")
    assert pembro.evidence[0].row_id == "msi-h-colorectal-pembrolizumab"
    assert "msi-h-solid-pembrolizumab" in [e.row_id for e in pembro.evidence]
    assert {s.therapy for s in crc.suggestions} == {"pembrolizumab", "nivolumab"}


def test_a_biomarker_without_evidence_gives_no_suggestion() -> None:
    tp53 = variant("tp53", "TP53", "HGNC:11998", "p.Arg175His")
    findings, _, result = run([tp53], [NSCLC])
    assert len(findings.biomarkers) == 1
    assert result.suggestions == ()
    assert result.findings_without_evidence == ("TP53 p.R175H",)
    # A finding with evidence in another cancer type only does not apply either.
    _, _, breast = run([EGFR_L858R], [condition("brca", SNOMED, "254837009")])
    assert breast.suggestions == ()


def test_unknown_observation_shapes_are_skipped_with_a_reason_not_guessed() -> None:
    observations = [
        coded_observation("pdl1-interp", "83052-1", coded(SNOMED, "10828004")),
        {**variant("nogene", "EGFR", "HGNC:3236", "p.L858R"), "component": []},
        quantity_observation("rna", "48019-4", 12.5, "1"),
        coded_observation("her2-odd", "85319-2", {"text": "strongly stained"}),
        {**EGFR_L858R, "id": "prelim", "status": "preliminary"},
        variant("absent", "KRAS", "HGNC:6407", "p.G12C", present="LA9634-2"),
        variant("mismatch", "BRAF", "HGNC:3236", "p.V600E"),
        quantity_observation("tmb-unit", "94076-7", 12, "%"),
        {k: v for k, v in EGFR_L858R.items() if k != "id"},
    ]
    findings = parse_biomarkers(observations)
    assert findings.biomarkers == ()
    reasons = {s.reference: s.reason for s in findings.skipped}
    assert "tumour proportion score" in reasons["Observation/pdl1-interp"]
    assert "without a gene" in reasons["Observation/nogene"]
    assert "not a biomarker Observation" in reasons["Observation/rna"]
    assert "HER2 value" in reasons["Observation/her2-odd"]
    assert "preliminary" in reasons["Observation/prelim"]
    assert "absent" in reasons["Observation/absent"]
    assert "HGNC:3236 is EGFR" in reasons["Observation/mismatch"]
    assert "unit" in reasons["Observation/tmb-unit"]
    assert "without an id" in reasons["Observation/?"]


def test_pd_l1_thresholds_and_label_exclusions() -> None:
    tps = quantity_observation("tps", "83053-9", 80, "%")
    _, _, alone = run([tps], [NSCLC])
    assert [s.therapy for s in alone.suggestions] == ["pembrolizumab"]
    assert alone.suggestions[0].evidence[0].row_id == "pdl1-tps50-nsclc-pembrolizumab"
    # With an EGFR driver the label excludes single-agent pembrolizumab.
    _, _, with_driver = run([tps, EGFR_L858R], [NSCLC])
    assert "pembrolizumab" not in [s.therapy for s in with_driver.suggestions]
    assert any("pdl1-tps50-nsclc-pembrolizumab not applied" in n for n in with_driver.notes)
    low = quantity_observation("tps-low", "83053-9", 0.5, "%")
    assert run([low], [NSCLC])[2].suggestions == ()


def test_resistance_evidence_removes_a_therapy() -> None:
    t790m = variant("t790m", "EGFR", "HGNC:3236", "p.Thr790Met")
    _, _, result = run([EGFR_L858R, t790m], [NSCLC])
    therapies = [s.therapy for s in result.suggestions]
    assert therapies[0] == "osimertinib"
    assert "erlotinib" not in therapies and "gefitinib" not in therapies
    assert {r.row_id for r in result.resistance} == {
        "egfr-t790m-nsclc-erlotinib-resistance",
        "egfr-t790m-nsclc-gefitinib-resistance",
    }


def test_tumour_agnostic_rows_respect_excluded_cancer_types() -> None:
    braf = variant("braf", "BRAF", "HGNC:1097", "p.Val600Glu")
    _, _, crc = run([braf], [condition("crc", SNOMED, "363406005")])
    assert [s.therapy for s in crc.suggestions] == ["encorafenib + cetuximab"]
    _, _, thyroid = run([braf], [condition("thy", ICD10, "C73")])
    assert [s.therapy for s in thyroid.suggestions] == ["dabrafenib + trametinib"]


def test_gene_level_brca_evidence_needs_a_pathogenic_classification() -> None:
    brca2 = variant(
        "brca2",
        "BRCA2",
        "HGNC:1101",
        "p.Ser1982fs",
        extra=(component("48002-0", coded(LOINC, "LA6683-2", "Germline")),),
    )
    implication = {
        "resourceType": "Observation",
        "id": "impl",
        "status": "final",
        "code": coded(
            "http://hl7.org/fhir/uv/genomics-reporting/CodeSystem/tbd-codes",
            "diagnostic-implication",
        ),
        "derivedFrom": [{"reference": "Observation/brca2"}],
        "component": [component("53037-8", coded(LOINC, "LA6668-3", "Pathogenic"))],
    }
    ovarian = condition("ov", SNOMED, "363443007")
    findings, _, result = run([brca2, implication], [ovarian])
    assert findings.biomarkers[0].significance == "pathogenic"
    assert findings.biomarkers[0].origin == "germline"
    assert [s.therapy for s in result.suggestions] == ["olaparib"]
    # Without a pathogenic classification the gene-level row does not apply.
    _, _, unclassified = run([brca2], [ovarian])
    assert unclassified.suggestions == ()


def test_fusions_her2_and_lung_cancer_without_histology() -> None:
    fusion = variant(
        "alk",
        "EML4",
        "HGNC:1316",
        extra=(
            component("48018-6", coded("http://www.genenames.org/geneId", "HGNC:427", "ALK")),
            component("48019-4", coded("http://sequenceontology.org", "SO:0001565", "gene_fusion")),
        ),
    )
    findings, _, result = run([fusion], [condition("lung", ICD10, "C34.90")])
    assert findings.biomarkers[0].kind == BiomarkerKind.FUSION
    assert findings.biomarkers[0].description == "ALK fusion (EML4::ALK)"
    therapies = [s.therapy for s in result.suggestions]
    assert set(therapies[:3]) == {"alectinib", "brigatinib", "lorlatinib"}
    assert all(s.score < 1.0 for s in result.suggestions)  # histology not coded
    assert any("histology not coded" in n for n in result.notes)

    her2 = coded_observation("her2", "85319-2", {"text": "3+"})
    _, _, breast = run([her2], [condition("br", SNOMED, "254837009")])
    assert breast.suggestions[0].therapy == "pertuzumab + trastuzumab"
    assert {s.therapy for s in breast.suggestions} == {"pertuzumab + trastuzumab", "trastuzumab"}


def test_evidence_table_is_real_cited_and_validated(tmp_path: Path) -> None:
    table = EvidenceTable.load()
    assert len(table.rows) >= 20
    assert all(row.citation and row.source_id for row in table.rows)
    assert all(drug.rxnorm.isdigit() for drug in table.drugs)
    broken = DEFAULT_EVIDENCE.read_text().replace("cancer: melanoma", "cancer: moonrock", 1)
    with pytest.raises(EvidenceTableError, match="moonrock"):
        EvidenceTable.from_bytes(broken.encode())


def test_model_directory_records_the_table_hash_and_refuses_a_changed_table(
    tmp_path: Path,
) -> None:
    model_dir = build_model_dir(tmp_path / "treatment")
    card = read_model_card(model_dir)
    expected = hashlib.sha256(DEFAULT_EVIDENCE.read_bytes()).hexdigest()
    assert card.task == "treatment-suggestion" and card.weights.sha256 == expected
    assert card.demo is False
    assert "never an order" in str(card.training["intended_use"])
    assert ("osimertinib", "1721560", "RXNORM") in [
        (label.name, label.code_value, label.coding_scheme) for label in card.labels
    ]
    model = TreatmentModel.load(model_dir)
    findings = parse_biomarkers([EGFR_L858R]).biomarkers
    cancers = parse_cancer_types([NSCLC]).cancer_types
    first = model.suggest(findings, cancers)[0]
    assert first.provenance is not None
    assert first.provenance.weights_sha256 == expected
    assert first.provenance.device_uid == card.device_uid

    (model_dir / "evidence.yaml").write_text(
        DEFAULT_EVIDENCE.read_text().replace('"1721560"', '"9999999"')
    )
    with pytest.raises(ModelLoadError, match="sha256"):
        TreatmentModel.load(model_dir)

    foreign = json.loads((model_dir / CARD_FILE).read_text())
    foreign["task"] = "risk-scoring"
    (model_dir / CARD_FILE).write_text(json.dumps(foreign))
    with pytest.raises(ModelLoadError, match="treatment-suggestion"):
        TreatmentModel.load(model_dir)
