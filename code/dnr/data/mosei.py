"""CMU-MOSEI (sentiment of 23k opinion clips, scores in [-3, 3]) from the field's feature files:
the CMU-MOSI loader (mosi.py, which documents the file families and reading rules), declared for
MOSEI's file names and feature sizes.

Published sizes: MMSA's train count is 16,326 (config_regression.json); the total of 22,856 is
reported (mdswyz/DMD issue 9), so valid / test 1,871 / 4,659 are inferred from the two, and taken to
hold for CMU's seq_length_50 pickles too. MultiBench's mosei_raw.pkl: not known (it drops the
samples without text when read; the loader prints what it read).
"""
from .mosi import FeatureDataset, register_feature_dataset

MOSEI = register_feature_dataset(FeatureDataset(
    name="mosei",
    title="CMU-MOSEI",
    files={"mmsa": ("aligned_50.pkl", "unaligned_50.pkl"),
           "mult": ("mosei_senti_data.pkl", "mosei_senti_data_noalign.pkl"),
           "multibench": ("mosei_raw.pkl",)},
    # MulT's files: COVAREP 74, FACET 35; MultiBench's mosei_raw.pkl: 713 visual features (OpenFace
    # + FACET, MultiBench issue 23).
    dims={"mult": (74, 35), "multibench": (74, 713)},
    sizes={"mmsa": "16,326 / 1,871 / 4,659 (val / test inferred)", "mult": "16,326 / 1,871 / 4,659 (inferred)"},
))
