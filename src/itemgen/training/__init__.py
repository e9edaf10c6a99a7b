"""The training loop (Hugging Face Accelerate) and the sampled losses. Imports itemgen.evaluation
(validation during training) and below."""
