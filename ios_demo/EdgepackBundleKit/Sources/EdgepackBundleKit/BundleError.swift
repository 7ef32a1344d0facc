import Foundation

/// A problem with a bundle the user can fix, with the fix spelled out: the app shows `message`, one line
/// "problem; fix", as edgepack's CLI does.
public struct BundleError: Error, LocalizedError, Equatable {
    public let problem: String
    public let fix: String

    public init(_ problem: String, fix: String) {
        self.problem = problem
        self.fix = fix
    }

    public var message: String { "\(problem); \(fix)" }
    public var errorDescription: String? { message }

    static let reexport = "re-export the bundle"
}
