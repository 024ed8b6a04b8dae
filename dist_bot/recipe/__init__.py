"""The paper, one small module per idea, each readable beside its formula (He et al. 2019)."""
