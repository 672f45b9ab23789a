"""Plain nn.Modules: the CGNs, discriminators, BigGAN, U2-Net and the classifiers; no distribution inside."""
