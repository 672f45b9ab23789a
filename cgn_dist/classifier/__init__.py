"""The two classifier experiments of the paper: classifier/mnist (the MNIST table) and classifier/imagenet
(the invariant ResNet-50 and its evaluations)."""
