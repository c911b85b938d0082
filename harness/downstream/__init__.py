"""What generated defects are worth downstream: a segmentation U-Net and a defect-type classifier trained on
them, and anomalib's unsupervised detectors on the same test images, all scored by harness.metrics.detection."""
