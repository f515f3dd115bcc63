"""The HTTP shape of recalibration profiles (pydantic), apart from their storage rows
(`service.storage.tables`): what clients see does not change when a column does."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from pydantic import BaseModel, Field


class ProfileModel(BaseModel):
    name: str = Field(description="the model the profile was fitted for")
    sha256: str = Field(description="the model file's SHA-256 then: a model with another one does not use it")


class ConformalSummary(BaseModel):
    n: int = Field(description="images whose conformity scores the prediction sets use (each scored by a "
                               "calibrator that never saw it: out-of-fold)")
    class_counts: list[int] = Field(description="of those, per class (the Mondrian sets' n_k)")
    methods: list[str] = Field(description="the conformity scores it serves")


class CalibrationProfile(BaseModel):
    id: str
    model: Optional[ProfileModel] = Field(description="null for a model-independent profile (POST /v1/calibrations)")
    num_classes: int
    method: str = Field(description="temperature, vector or dirichlet (auto stores the method it chose)")
    parameters: dict[str, Any]
    label: Optional[str] = Field(description="the free-text name of the domain given at creation")
    n: int = Field(description="labelled images (or rows of logits) the profile was fitted on")
    data_sha256: str = Field(description="SHA-256 of the labelled data as fitted (inputs and labels)")
    created_at: datetime
    report: dict[str, Any] = Field(description="NLL / ECE-15 / Brier / accuracy before and after, the after "
                                               "figures measured by k-fold cross-fitting")
    conformal: Optional[ConformalSummary] = None


class CalibrationProfileList(BaseModel):
    calibrations: list[CalibrationProfile]
    count: int = Field(description="profiles listed here")
    limit: int = Field(description="CALIB_MAX_CALIBRATIONS: profiles the service keeps, all models together")


class CalibrationUsed(BaseModel):
    """Which calibration an answer used: a profile, or the model card's temperature."""

    id: Optional[str] = Field(description="the profile's id; null for the card's calibration")
    method: str
    source: str = Field(description="'profile' or 'card'")


class PredictionSetOut(BaseModel):
    indices: list[int]
    labels: list[str] = Field(description="the class indices as text (a profile knows no class names)")
    coverage: float
    method: str
    mondrian: bool


class CalibrationApplied(BaseModel):
    calibration: CalibrationUsed
    n: int
    probabilities: list[list[float]]
    prediction_sets: Optional[list[PredictionSetOut]] = Field(None, description="with coverage=c")
