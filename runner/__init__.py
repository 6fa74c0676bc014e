from spinquant.quiet import silence_known_noise

silence_known_noise()  # first: before any module here imports torchao or executorch
