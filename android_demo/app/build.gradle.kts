plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.edgepack.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "dev.edgepack.demo"
        minSdk = 27  // onnxruntime-genai's Android build; java.nio.file (bundlekit) needs 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk {
            abiFilters += listOf("arm64-v8a", "x86_64")  // the ABIs ExecuTorch's and onnxruntime's AARs ship
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }

    packaging {
        jniLibs {
            // Both runtimes' AARs carry the NDK's C++ runtime.
            pickFirsts += listOf("**/libc++_shared.so")
        }
    }
}

val executorchVersion: String by project
val onnxruntimeVersion: String by project
val genaiVersion: String by project

dependencies {
    implementation(project(":bundlekit"))

    // .pte bundles: ExecuTorch's LlmModule. The AAR has the XNNPACK backend and the kernel libraries edgepack's
    // programs call (llama custom ops: custom_sdpa, update_cache; quantized_decomposed::embedding_4bit).
    implementation("org.pytorch:executorch-android:$executorchVersion")

    // ONNX bundles (onnxruntime-genai model folders): the Generator API on ONNX Runtime. An
    // onnxruntime-genai-android AAR put in app/libs (a GitHub release asset) is used instead of Maven's.
    implementation("com.microsoft.onnxruntime:onnxruntime-android:$onnxruntimeVersion")
    val localGenai = fileTree("libs") { include("onnxruntime-genai-android-*.aar") }
    if (localGenai.isEmpty) {
        implementation("com.microsoft.onnxruntime:onnxruntime-genai-android:$genaiVersion")
    } else {
        implementation(localGenai)
    }

    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.core:core-ktx:1.13.1")
    implementation("androidx.documentfile:documentfile:1.0.1")
}
