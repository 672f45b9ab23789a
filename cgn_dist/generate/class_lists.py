"""Curated ImageNet class ids for the "best_classes" counterfactual mode (data, not code).

Origin: the lists MASKS, FOREGROUND and BACKGROUNDS of imagenet/generate_data.py in the authors' public
repository autonomousvision/counterfactual_generative_networks (read at commit 1cba9d4; MIT licence, see
ORIGINAL_LICENSE.txt in the reference material). There the author picked shapes, textures and backgrounds
that transfer well; in "best_classes" mode each sample draws its shape class from BEST_SHAPE_CLASSES, its
texture class from BEST_TEXTURE_CLASSES and its background class from BEST_BACKGROUND_CLASSES, uniformly
and independently.
"""

# 76 ids: classes whose masks (shapes) are clean.
BEST_SHAPE_CLASSES = (
    9, 18, 22, 35, 56, 63, 96, 97, 119, 207, 225, 260, 275, 323, 330, 350, 370, 403, 411,
    414, 427, 438, 439, 441, 460, 484, 493, 518, 532, 540, 550, 559, 561, 570, 604, 647,
    688, 713, 724, 749, 751, 756, 759, 779, 780, 802, 814, 833, 841, 849, 850, 859, 869,
    872, 873, 874, 876, 880, 881, 883, 894, 897, 898, 900, 907, 930, 933, 945, 947, 949,
    950, 953, 963, 966, 967, 980,
)

# 75 ids: classes whose textures (foregrounds) are distinctive.
BEST_TEXTURE_CLASSES = (
    12, 15, 18, 25, 54, 66, 72, 130, 145, 207, 251, 267, 271, 275, 293, 323, 385,
    388, 407, 409, 427, 438, 439, 441, 454, 461, 468, 482, 483, 486, 490, 492, 509,
    530, 555, 607, 608, 629, 649, 652, 681, 688, 719, 720, 728, 737, 741, 751, 756,
    779, 800, 810, 850, 852, 854, 869, 881, 907, 911, 930, 936, 937, 938, 941, 949,
    950, 951, 954, 957, 959, 963, 966, 985, 987, 992,
)

# 38 ids: classes whose backgrounds are distinctive.
BEST_BACKGROUND_CLASSES = (
    7, 9, 20, 30, 35, 46, 50, 65, 72, 93, 96, 97, 119, 133, 147, 337, 350, 353, 354,
    383, 429, 460, 693, 801, 888, 947, 949, 952, 953, 955, 958, 970, 972, 973, 974,
    977, 979, 998,
)
