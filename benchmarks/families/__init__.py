"""Random-weight models at the real architectures of the larger families, for GPU timing runs:
`sd3.random_sd3(device)` (SD3.5 medium) and `flux.random_flux(device)` (FLUX.1-dev). Speed does
not depend on weight values, so nothing is downloaded. Each also builds a `tiny` stand-in, so the
code path can be checked on a CPU."""
