"""The paper's numbers, in one place (arXiv 2512.23448: its text, Tables 1 and 2, and its
reference code).

Every default that comes from the paper or its reference code is defined here once and
imported by the layers, the model, the solver and the training recipe.
"""

from __future__ import annotations

# --- Initialisation (Appendix A.2) ----------------------------------------------------------------
#: Std of every non-residual projection (embeddings, attention q/k/v, FFN first linears,
#: routers, MoE gate, LoRA A).
INIT_STD = 0.02
#: LayerNorm epsilon (router LayerNorms and the GPT's LayerNorms).
LAYER_NORM_EPS = 1e-5
#: Initial value of the DSC channel scale γ.
GAMMA_INIT = 0.1
#: The reference code's raw bank: ``0.02 × orthogonal``, normalised in the forward pass only
#: (never re-projected), in the weight-decay group.
REFERENCE_BANK_INIT_SCALE = 0.02

# --- DSC routing (Algorithms 1 and 2) -------------------------------------------------------------
#: Logit clip τ.
TAU = 20.0
#: ε of the coefficient normalisation ``φ / (S + ε)`` and of the bank-row normalisation.
EPS = 1e-6
#: Target μ of the budget regulariser ``max(0, μ − mean S)²``.
BUDGET_TARGET = 1.0

# --- Regulariser weights λ ------------------------------------------------------------------------
LOSS_WEIGHTS = {"aux": 0.01, "budget": 0.01, "frame": 0.001, "z": 1e-4}

# --- Standard MoE baseline ------------------------------------------------------------------------
#: Std of the Gaussian jitter added to the MoE router logits in training.
MOE_JITTER_STD = 0.01

# --- Paper model (Table 2) ------------------------------------------------------------------------
D_MODEL = 384
NUM_LAYERS = 6
NUM_HEADS = 6
VOCAB_SIZE = 50304
SEQ_LEN = 256
DROPOUT_RATE = 0.1
TOTAL_PARAMS = 35_000_000
ACTIVE_PARAMS = 28_000_000

# Iso-parameter FFN sizes of the paper setting (Appendix A.2); MoLoRA is not in the paper: its
# sizes are :func:`dsc_jax.models.solver.solve_iso_active`'s at the same budgets.
DENSE_HIDDEN = 2611
MOE_NUM_EXPERTS, MOE_TOP_K, MOE_HIDDEN = 5, 2, 545
DSC_NUM_BASES, DSC_TOP_K, DSC_HIDDEN = 1523, 4, 327
MOLORA_NUM_EXPERTS, MOLORA_TOP_K, MOLORA_RANK, MOLORA_HIDDEN = 16, 2, 108, 868

# --- Iso-active solver (Appendix A.2) -------------------------------------------------------------
SOLVER_MIN_HIDDEN = 32
SOLVER_MAX_MOE_EXPERTS = 255

# --- Training recipe (Appendix A.2) ---------------------------------------------------------------
LEARNING_RATE = 6e-4
MIN_LEARNING_RATE = 6e-5
WARMUP_STEPS = 150
NUM_TRAIN_STEPS = 2000
WEIGHT_DECAY = 0.02
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.95, 1e-8
GRAD_CLIP_NORM = 1.0
ROUTER_LR_MULTIPLIER = 5.0
BATCH_SIZE, MICRO_BATCHES = 128, 8
EVAL_EVERY_STEPS, EVAL_BATCHES, EVAL_BATCH_SIZE = 250, 50, 16
SEEDS = (42, 1337)

# --- Reported results (Table 1: one T4 GPU, PyTorch 2.5) ------------------------------------------
TABLE_1 = {
    "dense": {"total": 35.00e6, "active": 35.00e6, "val_loss": (5.171, 0.004), "ms": 39.90},
    "moe": {"total": 35.54e6, "active": 28.00e6, "val_loss": (5.125, 0.009), "ms": 60.55},
    "dsc": {"total": 35.01e6, "active": 28.00e6, "val_loss": (5.126, 0.006), "ms": 51.20},
}
