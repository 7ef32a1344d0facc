// The edgepack demo app (:app) and its bundle handling as a plain JVM library (:bundlekit), whose unit tests
// also run in edgepack's CI without Gradle (bundlekit/test.sh).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "edgepack-demo"
include(":app", ":bundlekit")
