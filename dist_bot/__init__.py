"""dist_bot: large-batch distributed ImageNet training with the full "Bag of Tricks" recipe.

He, Zhang, Zhang, Zhang, Xie, Li: "Bag of Tricks for Image Classification with Convolutional Neural
Networks", CVPR 2019 (arXiv:1812.01187). See README.md for the commands.
"""

__version__ = "0.1.0"
