"""rnp-tf: Runtime Neural Pruning in TensorFlow 2 / Keras 3.

A CNN keeps all of its weights; for every input an LSTM agent decides, layer
by layer, how many channel groups of the next convolution to compute.

Example:

>>> import rnp_tf
>>> model = rnp_tf.RNPModel(rnp_tf.backbones.cifar_cnn(), image_shape=(32, 32, 3),
...                         num_classes=10)
"""

from rnp_tf import backbones
from rnp_tf import dqn
from rnp_tf.agent import DecisionAgent
from rnp_tf.agent import epsilon_greedy_actions
from rnp_tf.agent import greedy_actions
from rnp_tf.backbones import cifar_cnn
from rnp_tf.backbones import decide_per_stage
from rnp_tf.backbones import vgg_cifar
from rnp_tf.backbones import get_backbone
from rnp_tf.backbones import mobilenet_v2
from rnp_tf.backbones import resnet50
from rnp_tf.backbones import resnet_cifar
from rnp_tf.backbones import vgg16
from rnp_tf.callbacks import AtomicCheckpoint
from rnp_tf.callbacks import BestKnobWeights
from rnp_tf.callbacks import CompactProgressBar
from rnp_tf.callbacks import ResumableCheckpoint
from rnp_tf import convert
from rnp_tf.convert import ConversionError
from rnp_tf.convert import from_keras
from rnp_tf.data import Dataset
from rnp_tf.data import load_dataset
from rnp_tf.engine import DenseRunner
from rnp_tf.engine import InferenceEngine
from rnp_tf.evaluation import evaluate_model
from rnp_tf import knob
from rnp_tf.layers import GatedConv2D
from rnp_tf.layers import GatedDepthwiseConv2D
from rnp_tf.metrics import ActionShares
from rnp_tf.metrics import StdDev
from rnp_tf.model import RNPModel
from rnp_tf import plan
from rnp_tf.plan import NetworkPlan
from rnp_tf.plan import build_plan
from rnp_tf.reorder import channel_importance
from rnp_tf.reorder import reorder_channels
from rnp_tf import rollout
from rnp_tf.schedule import Schedule
from rnp_tf.tflite_runner import TFLiteRNPRunner

__version__ = "0.1.0"
