"""torchvision's ResNet (torchvision/models/resnet.py) re-stated in plain torch: the reference
the PyTorch conversion is checked against (torchvision itself does not load beside the CPU
build of torch here).

Module names, layer order, the v1.5 Bottleneck (stride on the 3×3 conv) and the dilation rule
of `replace_stride_with_dilation` are torchvision's: in a dilated stage the first block gets
the previous dilation, the later blocks the new one; torchvision's BasicBlock refuses any
dilation. One addition: `width_divisor` (default 1 = torchvision) narrows every stage, like
this project's ¼- and ⅛-width variants. `dilate_basic_` is the README's recipe for running a
torchvision ResNet-18 at output stride 8 the way this project does.
"""
import torch
from torch import nn


def conv3x3(in_planes, out_planes, stride=1, dilation=1):
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                   bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
    super().__init__()
    if dilation > 1:
      raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
    super().__init__()
    self.conv1 = conv1x1(inplanes, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes, stride, dilation)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = conv1x1(planes, planes * self.expansion)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):

  def __init__(self, block, layers, num_classes=1000, replace_stride_with_dilation=None,
               width_divisor=1):
    super().__init__()
    w = 64 // width_divisor
    self.inplanes = w
    self.dilation = 1
    replace_stride_with_dilation = replace_stride_with_dilation or [False, False, False]
    self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(self.inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, w, layers[0])
    self.layer2 = self._make_layer(block, 2 * w, layers[1], 2, replace_stride_with_dilation[0])
    self.layer3 = self._make_layer(block, 4 * w, layers[2], 2, replace_stride_with_dilation[1])
    self.layer4 = self._make_layer(block, 8 * w, layers[3], 2, replace_stride_with_dilation[2])
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(8 * w * block.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
    downsample = None
    previous_dilation = self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
    self.inplanes = planes * block.expansion
    for _ in range(1, blocks):
      layers.append(block(self.inplanes, planes, dilation=self.dilation))
    return nn.Sequential(*layers)

  def features(self, x):
    """The backbone map: layer4's output [B, C, H/8, W/8] (at output stride 8)."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))

  def forward(self, x):
    return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def resnet18(**kwargs):
  return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet50(**kwargs):
  return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def dilate_basic_(model):
  """Output stride 8 for a torchvision ResNet-18/34, in place (the README's recipe): layer3 and
  layer4 drop their stride; the first block's conv1 keeps the previous dilation (1, then 2),
  every other 3×3 conv of the stage gets 2 (layer3) or 4 (layer4)."""
  for layer, previous, dilation in ((model.layer3, 1, 2), (model.layer4, 2, 4)):
    for j, block in enumerate(layer):
      for conv, d in ((block.conv1, previous if j == 0 else dilation), (block.conv2, dilation)):
        conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
      if block.downsample is not None:
        block.downsample[0].stride = (1, 1)
  return model


def randomize_bn_(model, images):
  """Non-trivial inference BatchNorm: random affine parameters, and running statistics set to
  those of one train-mode pass over `images` (momentum 1), as a trained network would have."""
  g = torch.Generator().manual_seed(1)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      with torch.no_grad():
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      m.momentum = 1.0
  model.train()
  with torch.no_grad():
    model.features(images)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.momentum = 0.1
  return model.eval()
