// swift-tools-version:5.9
// EdgepackBundleKit: the iOS demo's bundle handling (manifest and checksums, chat format, stop and think
// handling, UTF-8-safe streaming), the Swift twin of android_demo/bundlekit. `swift test` (macOS) runs its
// tests against the golden vectors edgepack's `python -m pytest tests/test_demo_vectors.py` writes.
import PackageDescription

let package = Package(
    name: "EdgepackBundleKit",
    platforms: [.iOS(.v17), .macOS(.v14)],
    products: [
        .library(name: "EdgepackBundleKit", targets: ["EdgepackBundleKit"]),
    ],
    targets: [
        .target(name: "EdgepackBundleKit"),
        .testTarget(name: "EdgepackBundleKitTests", dependencies: ["EdgepackBundleKit"]),
    ]
)
